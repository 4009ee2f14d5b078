"""A cohort member's outputs, from the cohort's directory: snakemake → kdbench.io.link_outputs."""

from pathlib import Path

from kdbench.io import link_outputs
from kdbench.jobs import run_job

run_job(
    link_outputs,
    snakemake.log[0],
    source=Path(snakemake.input[0], snakemake.params.member),
    outputs=list(snakemake.output),
)
