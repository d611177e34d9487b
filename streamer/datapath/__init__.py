"""The kernel side: the contract with bpf/classifier.h (layout), a policy compiled into the
classifier's tables (compiler), one loaded classifier instance (datapath, composed of loader,
the only place that imports bcc, banks, tables, reaper and attach over maps and bindings, with
its config), and the reference model of its verdicts (reference)."""
