"""Aggregate every finished run: snakemake input/output/log → kdbench.summary.aggregate."""

from kdbench.runs import run_job
from kdbench.summary import aggregate

run_job(
    aggregate,
    snakemake.log[0],
    metrics=[*snakemake.input.teachers, *snakemake.input.students],
    runs_csv=snakemake.output.runs,
    summary_csv=snakemake.output.summary,
    chart=snakemake.output.chart,
)
