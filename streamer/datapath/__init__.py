"""The kernel side: the contract with bpf/classifier.h (layout), a policy compiled into the
classifier's tables (compiler), one loaded classifier instance (datapath, composed of loader,
which loads the cached build with libbpf, banks, tables, reaper and attach over maps and
bindings, with its config), the build itself (build: bcc in a child process, the only import
of bcc; artifact: its file and cache key), and the reference model of its verdicts
(reference)."""
