"""A griffe extension for the API reference (mkdocs.yml names it). The docstrings are Google style
with a few Sphinx constructs (``:class:`X```, ``:math:`x```, ``.. math::`` blocks, ``::`` literal
blocks) and doctests; it rewrites them, once per object, to the Markdown that mkdocstrings renders
(code spans, MathJax through arithmatex, and ``pycon`` code blocks). The source is not changed."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj|ref):`~?([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _role(match: re.Match[str]) -> str:
    text = match.group(0)
    name = match.group(1)
    return f"`{name.rsplit('.', 1)[-1] if '`~' in text else name}`"


def _blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped == ".. math::":
            body: list[str] = []
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
            ):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            out += ["", f"{indent}$$"] + [f"{indent}{b}" for b in body if b] + [f"{indent}$$", ""]
            continue
        if stripped.startswith(">>>"):  # a doctest: a pycon code block, up to a blank line
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            out += [f"{indent}```pycon"] + [f"{indent}{b}" for b in block] + [f"{indent}```"]
            continue
        if line.endswith("::") and not stripped.startswith(".."):
            out.append(line[:-1])  # "for example::" then an indented block: a code block
        else:
            out.append(line)
        i += 1
    return "\n".join(out)


class SphinxToMarkdown(griffe.Extension):
    """Rewrites each docstring once, when griffe has loaded its object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _blocks(obj.docstring.value)
        text = _MATH.sub(lambda m: f"${m.group(1)}$", text)
        obj.docstring.value = _ROLE.sub(_role, text)
