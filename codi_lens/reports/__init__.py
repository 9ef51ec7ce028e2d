"""Reports: the tables, figures and summaries each experiment writes, from the tidy results a library call
returned, so a notebook or a test gets them without the command line. One module per family of experiments
(``importance``, ``patching``, ``reading``, ``saes``), and the shipped models' cards (``model_card``).
Imports anything below it; nothing imports it but the experiments.
"""
