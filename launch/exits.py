"""Exit codes of the `lsys` commands, one home for all of them (docs/reliability.md lists them)."""

INVALID_INPUT = 2  # a bad config, override, path or option: one `lsys: invalid input: ...` line, nothing started
NONFINITE = 3  # train.nonfinite ended the run: a step's loss or gradient norm was not finite
TIMEOUT = 124  # --timeout expired and every rank was stopped (as timeout(1) reports it)
