"""Diagnostic figures of one teacher → student pair: snakemake → kdbench.diagnostics.diagnose."""

from kdbench.diagnostics import diagnose
from kdbench.jobs import run_job

run_job(
    diagnose,
    snakemake.log[0],
    threads=snakemake.threads,
    dataset=snakemake.wildcards.dataset,
    data=snakemake.params.data,
    weights=list(snakemake.input.weights),
    run_metrics=list(snakemake.input.runs),
    affected_table=snakemake.input.affected,
    checkpoint=snakemake.params.checkpoint,
    n_images=snakemake.params.n_images,
    images=snakemake.params.images,
    tau=snakemake.params.tau,
    spectra_channels=snakemake.params.spectra_channels,
    batch_size=snakemake.params.batch_size,
    outputs=dict(snakemake.output.items()),
)
