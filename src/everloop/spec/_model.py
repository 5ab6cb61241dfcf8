"""The project file `everloop.yaml` as typed pydantic models: every key typed, defaulted, documented."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "f1", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Metrics where lower is better; the gate and monitor compare in "higher is better" terms.
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae", "calibration_error"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SqlSource(_Strict):
    url: str = Field(description="SQLAlchemy URL of the database, e.g. sqlite:///data.db")
    query: str = Field(description="SELECT statement whose rows are the dataset")


class DataSpec(_Strict):
    source: str | SqlSource = Field(description="csv/parquet file (relative to the project), or sql: {url, query}")
    target: str = Field(description="the label column")
    id: str | None = Field(None, description="entity id column, excluded from features")
    timestamp: str | None = Field(None, description="event time column, used for time splits and windows")


class FeaturesSpec(_Strict):
    numeric: list[str] | None = Field(None, description="numeric feature columns; inferred when absent")
    categorical: list[str] | None = Field(None, description="categorical feature columns; inferred when absent")
    datetime: list[str] | None = Field(None, description="date/time feature columns, used as year, month, day, "
                                       "weekday and hour; inferred when absent")
    categorical_encoding: Literal["onehot", "ordinal"] = Field(
        "onehot", description="onehot (for linear models and most others) or ordinal (compact, for tree ensembles)"
    )
    exclude: list[str] = Field(default_factory=list, description="columns never used as features")
    custom: str | None = Field(None, description="user transformer factory as 'module:callable'")


class ModelSpec(_Strict):
    estimator: str | None = Field(
        None,
        description="dotted path of a scikit-learn compatible estimator; "
        "HistGradientBoostingClassifier/Regressor by task when absent",
    )
    params: dict[str, object] = Field(default_factory=dict, description="keyword arguments of the estimator")
    seed: int = Field(42, description="seed for the split and the estimator's random_state")


class SplitSpec(_Strict):
    holdout: float = Field(0.2, gt=0, lt=1, description="share of rows held out for evaluation")
    by_time: bool = Field(False, description="hold out the latest rows (needs data.timestamp)")


class EvaluationSpec(_Strict):
    split: SplitSpec = Field(default_factory=SplitSpec)
    metric: Literal[METRICS] | None = Field(  # type: ignore[valid-type]
        None, description="roc_auc for classification and rmse for regression when absent"
    )
    slices: list[str] = Field(default_factory=list, description="columns whose slices are evaluated separately")


class PromotionSpec(_Strict):
    min_metric: float | None = Field(None, description="a candidate below this metric is refused")
    max_regression: float = Field(0.0, ge=0, description="largest allowed loss of metric vs production")
    slice_tolerance: float = Field(
        0.02, ge=0, description="largest allowed loss of metric vs production on any slice of evaluation.slices"
    )
    min_slice_rows: int = Field(30, ge=1, description="slices with fewer evaluation rows are not compared")


class WindowSpec(_Strict):
    rows: int | None = Field(None, gt=0, description="the window is the latest N predictions")
    minutes: float | None = Field(None, gt=0, description="the window is the predictions of the last N minutes")

    @model_validator(mode="after")
    def _one_kind(self) -> "WindowSpec":
        if (self.rows is None) == (self.minutes is None):
            raise ValueError("give exactly one of 'rows' or 'minutes'")
        return self


class DriftSpec(_Strict):
    max_drifted_share: float = Field(0.2, ge=0, le=1, description="dataset drift when more than this share of features drift")
    p_value: float = Field(0.01, gt=0, lt=1, description="a feature drifts when its test's p-value is below this ...")
    min_effect: float = Field(
        0.03, ge=0, le=1,
        description="... and its effect size (KS statistic, or total variation distance for categories) is at least this",
    )


class PerformanceSpec(_Strict):
    min_metric: float | None = Field(None, description="decay when the labelled metric of a window falls below this")
    max_drop: float = Field(
        0.05, ge=0, description="decay when the labelled metric of a window is worse than the model's evaluation "
        "metric by more than this"
    )


class SkewSpec(_Strict):
    max_null_rate_change: float = Field(0.1, ge=0, le=1, description="serving null rate above training's by more")
    max_unseen_share: float = Field(0.1, ge=0, le=1, description="share of serving values in unseen categories")
    max_out_of_range_share: float = Field(0.1, ge=0, le=1, description="share of serving values outside the "
                                          "training range")


class MonitoringSpec(_Strict):
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(rows=5000))
    drift: DriftSpec = Field(default_factory=DriftSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    skew: SkewSpec = Field(default_factory=SkewSpec)
    min_labelled_rows: int = Field(50, ge=1, description="fewest labelled rows a window needs for a metric")
    webhook: str | None = Field(None, description="URL that alerts are POSTed to as JSON (or EVERLOOP_WEBHOOK_URL)")


class RetrainDataSpec(_Strict):
    recent_rows: int = Field(50000, gt=0, description="the latest N labelled predictions are the new training data")
    include_reference: bool = Field(True, description="also train on the production model's own training data")
    recent_weight: float | Literal["balanced"] = Field(
        "balanced",
        description="weight of each recent row when training on reference + recent rows; 'balanced' makes the "
        "recent rows weigh as much in total as the reference rows, so a changed relationship is learned",
    )

    @model_validator(mode="after")
    def _positive_weight(self) -> "RetrainDataSpec":
        if isinstance(self.recent_weight, float) and self.recent_weight <= 0:
            raise ValueError(f"recent_weight must be positive or 'balanced', got {self.recent_weight}")
        return self


class RetrainingSpec(_Strict):
    triggers: list[Literal["drift", "performance", "estimated_performance", "schedule", "new_labels"]] = Field(
        default_factory=lambda: ["drift", "performance"]
    )
    data: RetrainDataSpec = Field(default_factory=RetrainDataSpec)
    cooldown_minutes: float = Field(60, ge=0, description="least time between two retrainings")
    schedule_minutes: float | None = Field(None, gt=0, description="with the 'schedule' trigger: retrain this often")
    min_new_labels: int = Field(1000, gt=0, description="with the 'new_labels' trigger: retrain after this many")


class ServingSpec(_Strict):
    max_batch_rows: int = Field(10000, gt=0, description="largest batch one request may send (413 above)")
    log_predictions: bool = Field(True, description="write every prediction to the store's prediction log")
    reload_seconds: float = Field(1.0, gt=0, description="how often the service checks the production alias")
    micro_batching: bool = Field(True, description="gather concurrent requests into one model call; off: one "
                                                   "call per request")
    batch_wait_ms: float = Field(2.0, ge=0, le=100, description="longest a gathered batch waits for requests known "
                                                                "to be on their way (a lone request never waits)")
    compile_trees: bool = Field(True, description="serve tree ensembles compiled to native code (TL2cgen, needs a "
                                                  "C compiler) once they match scikit-learn; off: scikit-learn serves")


class ProjectSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="project name, also the model's name")
    data: DataSpec
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)
    retraining: RetrainingSpec = Field(default_factory=RetrainingSpec)
    serving: ServingSpec = Field(default_factory=ServingSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "ProjectSpec":
        if self.evaluation.split.by_time and not self.data.timestamp:
            raise ValueError("evaluation.split.by_time needs data.timestamp")
        named = {self.data.target, self.data.id, self.data.timestamp} - {None}
        for kind in ("numeric", "categorical", "datetime"):
            overlap = named & set(getattr(self.features, kind) or [])
            if overlap:
                raise ValueError(f"features.{kind} lists {sorted(overlap)}, which is the target, id or timestamp")
        if self.features.custom and ":" not in self.features.custom:
            raise ValueError(f"features.custom {self.features.custom!r}: expected 'module:callable'")
        return self
