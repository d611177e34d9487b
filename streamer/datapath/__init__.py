"""The kernel side: a policy compiled into the classifier's tables (compiler), the loaded
programs and maps (the only place that imports bcc), and the reference model of their
verdicts (reference)."""
