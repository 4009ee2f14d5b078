"""Train one teacher: snakemake params/output/log → kdbench.runs.train."""

from kdbench.jobs import run_job
from kdbench.runs import train

run_job(
    train,
    snakemake.log[0],
    threads=snakemake.threads,
    gpu=True,
    role="teacher",
    dataset=snakemake.wildcards.dataset,
    arch=snakemake.wildcards.arch,
    seed=int(snakemake.wildcards.seed),
    method="vanilla",
    variant="teacher",
    data=snakemake.params.data,
    train=snakemake.params.train,
    method_params=snakemake.params.method_params,
    state=snakemake.params.state,
    outputs=dict(snakemake.output.items()),
)
