"""The exit statuses of every epmoe process (ranks, the launcher, the CLIs): one table, so a
launcher, a Slurm script or a supervisor can tell the cases apart."""

EXIT_OK = 0
EXIT_JOB_FAILED = 1  # not the user's input: the job failed (a supervisor such as torchrun may restart it)
EXIT_USAGE = 2  # the user's input cannot work (config, data, checkpoint): one line on stderr, nothing started
# stopped by a signal (SIGTERM, SIGUSR1: preemption, a time limit) after saving a complete checkpoint;
# run the same command again to continue. 75 is sysexits' EX_TEMPFAIL: "try again later"
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT) after saving a checkpoint: the shells' 128 + SIGINT
