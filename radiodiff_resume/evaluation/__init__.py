"""``radiodiff-resume evaluate``: sample a split with a trained LDM, write one PNG per map and the
metrics RadioDiff reports, resumably and across processes (see :mod:`radiodiff_resume.tools.evaluate`)."""
