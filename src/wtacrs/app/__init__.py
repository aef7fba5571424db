"""The ``wtacrs`` command and what only it needs: fine-tuning runs, data sets, metrics, reports."""
