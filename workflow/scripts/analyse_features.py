"""Tables and correlations of a dataset's feature metrics: snakemake → kdbench.analysis."""

from kdbench.analysis import analyse
from kdbench.jobs import run_job

run_job(
    analyse,
    snakemake.log[0],
    threads=snakemake.threads,
    stage_tables=list(snakemake.input.stages),
    summary_table=snakemake.output.summary,
    method_table=snakemake.output.table,
    correlation_table=snakemake.output.correlations,
    accuracy_plot=snakemake.output.accuracy_plot,
    metrics_plot=snakemake.output.metrics_plot,
)
