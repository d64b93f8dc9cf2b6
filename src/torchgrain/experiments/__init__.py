"""The experiments behind the ``torchgrain`` command: offline models and data, runs, reports."""
