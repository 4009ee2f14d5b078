"""Accuracy against Tucker rank: snakemake → kdbench.summary.rank_chart_from_csv."""

from kdbench.jobs import run_job
from kdbench.summary import rank_chart_from_csv

run_job(
    rank_chart_from_csv,
    snakemake.log[0],
    summary_csv=snakemake.input.summary,
    path=snakemake.output.chart,
)
