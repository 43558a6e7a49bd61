"""``python -m linbias.harness``: lm-eval's command line with linbias's model and tasks installed
(``linbias.harness.plugin``), for lm-eval releases without entry-point discovery."""

from linbias.harness.plugin import install

install()

from lm_eval.__main__ import cli_evaluate  # noqa: E402

cli_evaluate()
