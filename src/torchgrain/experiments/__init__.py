"""The experiments behind the ``torchgrain`` command: real offline models and data, runs, reports."""
