"""Aggregate every finished run: snakemake input/output/log → kdbench.summary.aggregate."""

from kdbench.jobs import run_job
from kdbench.summary import aggregate

run_job(
    aggregate,
    snakemake.log[0],
    metrics=[*snakemake.input.teachers, *snakemake.input.students],
    runs_csv=snakemake.output.runs,
    summary_csv=snakemake.output.summary,
    chart=snakemake.output.chart,
    accuracy=snakemake.params.accuracy,
    benchmarks=list(snakemake.input.benchmarks),
    shared_benchmarks=snakemake.params.cohort_runs,
    cost_csv=snakemake.output.cost,
    cost_plot=snakemake.output.cost_plot,
    provenance_csv=snakemake.output.provenance,
    anchors_path=snakemake.input.anchors,
    anchors_csv=snakemake.output.anchors,
    headline_csv=snakemake.output.headline,
)
