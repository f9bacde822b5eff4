"""``python -m tokprune.integrations.lmms_eval <lmms-eval arguments>``: see :func:`~tokprune.integrations.lmms_eval.main`."""

from tokprune.integrations.lmms_eval import main

main()
