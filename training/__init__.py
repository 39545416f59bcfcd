"""The trainer and its run folder: the CLI and set-up (train), the step loop (loop), the dataset reader (dataset),
the run folder's files and fingerprint (run_folder), the job lifeline, the power-function EMA and the σ-bin
running loss."""
