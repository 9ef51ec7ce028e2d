"""Running experiments: the resumable result store (:mod:`~codi_lens.run.store`), where units of work run
(:mod:`~codi_lens.run.executors`: here or on Ray) and the command-line plumbing every command shares
(:mod:`~codi_lens.run.cli`). Imports the core, loading and data only."""
