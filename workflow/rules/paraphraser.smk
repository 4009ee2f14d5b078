# Factor Transfer's paraphraser: one per dataset × teacher × teacher seed, trained alone on the
# teacher's stage maps, shared by every FT student of that teacher.


rule train_paraphraser:
    input:
        teacher=teacher_checkpoint,
    output:
        weights=f"{PARAPHRASER_DIR}/paraphraser.pt",
        metrics=f"{PARAPHRASER_DIR}/metrics.json",
        loss_plot=report(
            f"{PARAPHRASER_DIR}/Paraphraser_Loss.png",
            caption="../report/paraphraser.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "paraphraser of {teacher}",
                "method": "ft",
                "seed": "{seed}",
            },
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/paraphrasers/{{teacher}}-seed{{seed}}.log",
    # next after the teachers: the FT students wait for it
    priority: 5
    conda:
        "../envs/kdbench.yaml"
    threads: TRAIN_THREADS
    # one training run's share of a GPU: `--resources gpu_runs=N` lets N run at once
    resources:
        gpu_runs=1,
    params:
        data=data_params,
        train=kdconfig.train_params(config, "student"),
        ft=ft_params(),
        state=f"{STATE_DIR}/{{dataset}}/paraphrasers/{{teacher}}/seed{{seed}}.pt",
    script:
        "../scripts/train_paraphraser.py"
