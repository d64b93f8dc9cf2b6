"""Integrations with the rest of the ecosystem: ``distributed`` (torch.distributed)."""
