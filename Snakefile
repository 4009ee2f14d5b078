# kdbench: teachers → students per method × variant × seed → aggregated tables and the report.
# Run:    snakemake --cores all                       (the embedded demo, config/demo.yaml)
#         snakemake --cores all --configfile config/config.yaml   (the full CIFAR benchmark)
# Report: snakemake --report results/report.html
from pathlib import Path

from snakemake.utils import min_version, update_config

from kdbench import config as kdconfig

min_version("9.0")


# The embedded demo is the default: --config KEY=VALUE overrides its keys, --configfile replaces
# it (is not merged into it).
if not workflow.overwrite_configfiles:

    configfile: Path(workflow.basedir, "config/demo.yaml")


# Snakemake merged --config's values in, those inside a list or mapping as strings: again, typed
update_config(config, kdconfig.command_line_types(workflow.config_settings.config))
kdconfig.read_exponent_floats(config)
kdconfig.check_or_exit(
    config, Path(workflow.basedir, "workflow/schemas/config.schema.yaml")
)
# From here on the config holds its protocol's settings (kdbench.config.PROTOCOLS).
config.update(kdconfig.resolve(config))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/paraphraser.smk"
include: "workflow/rules/distill.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/analysis.smk"


rule all:
    default_target: True
    input:
        all_targets(),
