"""Rank a pair's most-affected stages and channels: snakemake → kdbench.analysis.most_affected."""

from kdbench.analysis import most_affected
from kdbench.jobs import run_job

run_job(
    most_affected,
    snakemake.log[0],
    threads=snakemake.threads,
    channel_tables=list(snakemake.input.channels),
    teacher=snakemake.wildcards.teacher,
    student=snakemake.wildcards.student,
    top_k=snakemake.params.top_k,
    table=snakemake.output.table,
    stages_plot=snakemake.output.stages_plot,
    channels_plot=snakemake.output.channels_plot,
)
