"""The evaluation report: the plots and tables a person reads after a run.

    from lesionstack.report import write_report
    page = write_report("artifacts")          # -> artifacts/report/index.html, PNG figures beside it

Reads cv.json and oof_stack.parquet (required) and, when present, folds.csv, oof_cnn.parquet,
stack/feature_importance.csv, cnn/fold_k/metrics.json, segmenter/metrics.json and weights, and the data
folder named by source.json (or `data_dir`) for the crops and demo-truth.csv.
"""

from lesionstack.report.build import ReportConfig, write_report
from lesionstack.report.inputs import ReportError

__all__ = ["ReportConfig", "ReportError", "write_report"]
