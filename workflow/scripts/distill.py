"""Train one student: snakemake input/params/output/log → kdbench.runs.train."""

from kdbench.jobs import run_job
from kdbench.runs import train

run_job(
    train,
    snakemake.log[0],
    threads=snakemake.threads,
    gpu=True,
    role="student",
    dataset=snakemake.wildcards.dataset,
    arch=snakemake.wildcards.student,
    seed=int(snakemake.wildcards.seed),
    method=snakemake.wildcards.method,
    variant=snakemake.wildcards.variant,
    teacher=snakemake.wildcards.teacher,
    teacher_weights=snakemake.input.get("teacher") or None,
    assets={k: v for k, v in snakemake.input.items() if k != "teacher"},
    data=snakemake.params.data,
    train=snakemake.params.train,
    method_params=snakemake.params.method_params,
    state=snakemake.params.state,
    outputs=dict(snakemake.output.items()),
)
