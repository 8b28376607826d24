"""Applications built on the library: the ``moekit`` command line, the demo, benchmarks, experiments
and their reports. The library (everything outside ``moekit.apps``) never imports from here."""
