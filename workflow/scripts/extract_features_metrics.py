"""Measure one trained model's feature maps: snakemake → kdbench.analysis.extract."""

from kdbench.analysis import extract
from kdbench.jobs import run_job

run_job(
    extract,
    snakemake.log[0],
    threads=snakemake.threads,
    dataset=snakemake.wildcards.dataset,
    data=snakemake.params.data,
    weights=snakemake.input.weights,
    run_metrics=snakemake.input.run,
    n_images=snakemake.params.n_images,
    checkpoint=snakemake.params.checkpoint,
    batch_size=snakemake.params.batch_size,
    channels_table=snakemake.output.channels,
    stages_table=snakemake.output.stages,
)
