# Every finished run → a tidy table, a summary over seeds and a chart.


rule aggregate:
    input:
        teachers=teacher_metrics(),
        students=student_metrics(),
    output:
        runs=report(
            f"{RESULTS}/summary/runs.csv",
            caption="../report/runs.rst",
            category="Results",
            labels={"table": "every run"},
        ),
        summary=report(
            f"{RESULTS}/summary/summary.csv",
            caption="../report/summary.rst",
            category="Results",
            labels={"table": "mean ± std over seeds"},
        ),
        chart=report(
            f"{RESULTS}/summary/accuracy_by_method.png",
            caption="../report/accuracy.rst",
            category="Results",
            labels={"figure": "accuracy per method"},
        ),
    log:
        f"{LOG_DIR}/aggregate.log",
    localrule: True
    conda:
        "../envs/kdbench.yaml"
    script:
        "../scripts/aggregate.py"
