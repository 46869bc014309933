"""Process management: the supervisor of `--workers N` server processes and what a worker does
for itself (stop with its supervisor). Ready files are snaplearn_common.files.write_ready_file's."""
