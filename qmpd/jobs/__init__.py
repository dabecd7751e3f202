"""Long-running jobs (QEMU's job.c and blockjob.c) and the block jobs built on them."""
