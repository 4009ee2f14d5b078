# Every finished run → tidy tables, statistics over seeds, published anchors, cost, provenance
# and charts.

#: each cohort's benchmark file → the directories of its members, who share its seconds
COHORT_BENCHMARKS = {
    f"{cohort_dir(c)}.benchmark.tsv": [student_dir(r) for r in c.members]
    for c in COHORTS
}


rule aggregate:
    input:
        teachers=teacher_metrics(),
        students=student_metrics(),
        benchmarks=benchmarks(),
        cohort_benchmarks=list(COHORT_BENCHMARKS),
        anchors=ANCHORS,
    output:
        runs=report(
            f"{RESULTS}/summary/runs.csv",
            caption="../report/runs.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "every run"},
        ),
        summary=report(
            f"{RESULTS}/summary/summary.csv",
            caption="../report/summary.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "summary over seeds"},
        ),
        headline=f"{RESULTS}/summary/headline.csv",
        chart=report(
            f"{RESULTS}/summary/accuracy_by_method.png",
            caption="../report/accuracy.rst",
            category="Results",
            subcategory="Charts",
            labels={"figure": "methods ranked"},
        ),
        anchors=report(
            f"{RESULTS}/summary/anchors.csv",
            caption="../report/anchors.rst",
            category="Results",
            subcategory="Tables",
            labels={"table": "published results beside ours"},
        ),
        cost=report(
            f"{RESULTS}/summary/cost.csv",
            caption="../report/cost.rst",
            category="Cost",
            labels={"table": "cost per method"},
        ),
        cost_plot=report(
            f"{RESULTS}/summary/cost_accuracy.png",
            caption="../report/cost_accuracy.rst",
            category="Cost",
            labels={"table": "cost against accuracy"},
        ),
        provenance=report(
            f"{RESULTS}/summary/provenance.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "versions, commits, devices"},
        ),
    log:
        f"{LOG_DIR}/aggregate.log",
    localrule: True
    conda:
        "../envs/kdbench.yaml"
    params:
        accuracy=ACCURACY,
        # the runs each cohort's job trained (cohort_size): its seconds are split among them
        cohort_runs=COHORT_BENCHMARKS,
    script:
        "../scripts/aggregate.py"


rule rank_chart:
    input:
        summary=f"{RESULTS}/summary/summary.csv",
    output:
        chart=report(
            f"{RESULTS}/summary/accuracy_by_rank.png",
            caption="../report/accuracy_by_rank.rst",
            category="Results",
            subcategory="Charts",
            labels={"figure": "accuracy against Tucker rank"},
        ),
    log:
        f"{LOG_DIR}/rank_chart.log",
    localrule: True
    conda:
        "../envs/kdbench.yaml"
    script:
        "../scripts/rank_chart.py"


rule learning_curves:
    input:
        runs=pair_metrics,
    output:
        chart=report(
            f"{RESULTS}/summary/{{dataset}}/{{teacher}}-{{student}}/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Learning curves",
            subcategory="{dataset}",
            labels={
                "dataset": "{dataset}",
                "pair": "{teacher} → {student}",
                "method": "every method",
                "seed": "mean and range",
            },
        ),
    log:
        f"{LOG_DIR}/{{dataset}}/learning_curves-{{teacher}}-{{student}}.log",
    localrule: True
    conda:
        "../envs/kdbench.yaml"
    script:
        "../scripts/learning_curves.py"
