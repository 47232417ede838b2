"""The run: the command line and its checks, the budget, ranks and torch.distributed, checkpoints, the finish,
the zip, the report, and main (the only module with side effects at the top)."""
