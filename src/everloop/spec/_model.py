"""The project file `everloop.yaml` as typed pydantic models: every key typed, defaulted, documented."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from everloop.spec._secrets import check_references, resolve_env

CLASSIFICATION_METRICS = ("roc_auc", "accuracy", "f1", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")
METRICS = CLASSIFICATION_METRICS + REGRESSION_METRICS
# Metrics where lower is better; the gate and monitor compare in "higher is better" terms.
LOWER_IS_BETTER = frozenset({"log_loss", "rmse", "mae", "calibration_error"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A setting that may hold a secret: `${NAME}` references the environment variable NAME, resolved where
# the value is used (never when the file is read), so the file and the stored specs hold no secret.
WithSecrets = Annotated[str, AfterValidator(check_references)]


class SqlSource(_Strict):
    url: WithSecrets = Field(description="SQLAlchemy URL of the database, e.g. sqlite:///data.db; keep a "
                             "password in the environment: postgresql+psycopg://bob:${PG_PASSWORD}@db/sales")
    query: str = Field(description="SELECT statement whose rows are the dataset")

    def resolved_url(self) -> str:
        """The URL with its `${NAME}` references replaced from the environment, for connecting; raises
        SpecError naming the variables that are not set."""
        return resolve_env(self.url, "data.source.url")


class DataSpec(_Strict):
    source: str | SqlSource = Field(description="csv/parquet file, folder or glob (relative to the project), or "
                                    "a database query as a mapping {url, query}")
    target: str = Field(description="the label column")
    id: str | None = Field(None, description="entity id column, excluded from features")
    timestamp: str | None = Field(None, description="event time column, used for time splits and windows")


class FeaturesSpec(_Strict):
    """Which columns are features, and of what kind. Each list names the kind of the columns it lists;
    every other column (not the target, id, timestamp or excluded) is inferred from the data, unless
    `infer_others` is false. An empty list names no column of its kind; it never means "no features"."""

    numeric: list[str] | None = Field(None, description="columns used as numeric features, whatever the data "
                                      "looks like (also kept when they look like identifiers)")
    categorical: list[str] | None = Field(None, description="columns used as categorical features, e.g. "
                                          "integer codes or text with many values")
    datetime: list[str] | None = Field(None, description="columns used as date/time features (year, month, "
                                       "day, weekday and hour)")
    infer_others: bool = Field(True, description="columns not named under numeric, categorical, datetime or "
                               "exclude are inferred as features (true) or left out (false: only the named "
                               "columns are features)")
    categorical_encoding: Literal["onehot", "ordinal"] = Field(
        "onehot", description="onehot (for linear models and most others) or ordinal (compact, for tree ensembles)"
    )
    exclude: list[str] = Field(default_factory=list, description="columns never used as features")
    custom: str | None = Field(None, description="user transformer factory as 'module:callable'")

    @model_validator(mode="after")
    def _named_once(self) -> "FeaturesSpec":
        seen: dict[str, str] = {}
        for key in ("numeric", "categorical", "datetime", "exclude"):
            for name in getattr(self, key) or []:
                if name in seen:
                    raise ValueError(f"column {name!r} is listed under both features.{seen[name]} and "
                                     f"features.{key}; keep it in one")
                seen[name] = key
        return self


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


def parse_tolerance(value: object) -> float | str:
    """A tolerance as written in the project file: a number >= 0 (absolute, in the metric's units),
    returned as float, or a percentage string such as "5%" (relative to a reference value), returned
    normalised ("5 %" -> "5%"). Raises ValueError naming the accepted forms."""
    expected = ("Input should be greater than or equal to 0 (an absolute amount, in the metric's units) "
                "or a percentage such as '5%' (of the reference value)")
    number: object = value
    relative = isinstance(value, str) and value.strip().endswith("%")
    if isinstance(value, str):
        number = value.strip().removesuffix("%").strip()
    if isinstance(number, bool) or not isinstance(number, (int, float, str)):
        raise ValueError(expected)
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(expected) from None
    if not 0 <= amount < float("inf"):  # also refuses NaN
        raise ValueError(expected)
    return f"{number}%" if relative else amount


# A loss allowed before a check fails: absolute (a number) or relative (e.g. "5%") to a reference value.
Tolerance = Annotated[float | str, BeforeValidator(parse_tolerance)]


class LiveSpec(_Strict):
    """How a shadow or canary candidate is judged on live traffic against production (`promotion.live`)."""

    min_rows: int = Field(1000, ge=1, description="fewest rows the candidate must have scored before any verdict "
                          "but an immediate rollback")
    min_labelled_rows: int = Field(500, ge=1, description="fewest labelled rows (the candidate's, and in shadow "
                                   "the same rows production answered) before it can be promoted")
    max_regression: Tolerance = Field(0.01, description="largest allowed loss of metric vs production on the "
                                      "live labelled rows: a number (metric units) or a percentage such as '1%'")
    max_latency_ratio: float = Field(1.5, gt=0, description="rolled back at once when the candidate's p99 "
                                     "latency is more than this multiple of production's")
    max_error_rate: float = Field(0.01, ge=0, le=1, description="rolled back at once when more than this share "
                                  "of the candidate's calls fail")


class PromotionSpec(_Strict):
    live: LiveSpec = Field(default_factory=LiveSpec, description="shadow/canary: judged on live traffic")
    min_metric: float | None = Field(None, description="a candidate below this metric is refused")
    max_regression: Tolerance = Field(
        0.0, description="largest allowed loss of metric vs production, on rows neither model trained on: a number "
        "(in the metric's units) or a percentage of production's value such as '1%'")
    slice_tolerance: Tolerance = Field(
        "2%", description="largest allowed loss of metric vs production on any slice of evaluation.slices: a number "
        "(in the metric's units) or a percentage of production's value on that slice"
    )
    min_slice_rows: int = Field(30, ge=1, description="slices with fewer evaluation rows are not compared")
    min_comparison_rows: int = Field(
        100, ge=1, description="fewest rows neither the candidate nor production trained on that the comparison "
        "with production needs (held-out rows, else the latest labelled traffic); fewer: the gate refuses")


class WindowSpec(_Strict):
    rows: int | None = Field(None, gt=0, description="the window is the latest N predictions")
    minutes: float | None = Field(None, gt=0, description="the window is the predictions of the last N minutes")

    @model_validator(mode="after")
    def _one_kind(self) -> "WindowSpec":
        if (self.rows is None) == (self.minutes is None):
            raise ValueError("give exactly one of 'rows' or 'minutes'")
        return self


class FeatureDriftSpec(_Strict):
    """Drift settings of one feature (`monitoring.drift.features.<name>`); unset keys keep the defaults."""

    p_value: float | None = Field(None, gt=0, lt=1, description="this feature's p_value (default: drift.p_value)")
    min_effect: float | None = Field(None, ge=0, le=1,
                                     description="this feature's min_effect (default: drift.min_effect)")
    ignore: bool | None = Field(
        None, description="true: reported but never counted in the dataset verdict; false: counted, also for a "
        "date/time feature (those are left out by default: they move forward with time by nature)",
    )


class PredictionDriftSpec(_Strict):
    """Prediction drift: the model's scores on a window against its scores on its held-out rows."""

    p_value: float = Field(0.01, gt=0, lt=1, description="prediction drift when the test's p-value is below this ...")
    min_effect: float = Field(
        0.1, ge=0, le=1, description="... and its effect (KS statistic, or total variation for classes) is at least "
        "this. Higher than for features: the reference is the model's few held-out rows, and a small move of "
        "the scores without a move of the features is rarely worth a page")


class DriftSpec(_Strict):
    max_drifted_share: float = Field(0.2, ge=0, le=1, description="dataset drift when more than this share of features drift")
    p_value: float = Field(0.01, gt=0, lt=1, description="a feature drifts when its test's p-value is below this ...")
    min_effect: float = Field(
        0.03, ge=0, le=1,
        description="... and its effect size (KS statistic, or total variation distance for categories) is at least this",
    )
    ignore: list[str] = Field(
        default_factory=list, description="features whose drift is reported but never counted in the dataset verdict"
    )
    features: dict[str, FeatureDriftSpec] = Field(
        default_factory=dict, description="per-feature settings overriding the defaults: {name: {p_value, "
        "min_effect, ignore}}",
    )
    severe_effect: float | None = Field(
        0.25, ge=0, le=1, description="a counted feature that drifts with an effect (KS statistic, total variation, "
        "share of values training never had, or rise of the null rate) of at least this makes the dataset drift by "
        "itself, whatever max_drifted_share says; null: only the share decides")
    prediction: PredictionDriftSpec = Field(default_factory=lambda: PredictionDriftSpec())

    @model_validator(mode="after")
    def _no_conflict(self) -> "DriftSpec":
        both = [name for name in self.ignore if name in self.features and self.features[name].ignore is False]
        if both:
            raise ValueError(f"{', '.join(both)} listed in 'ignore' but set 'ignore: false' under 'features': "
                             "keep one of the two")
        return self


class PerformanceSpec(_Strict):
    labelled_rows: int | None = Field(
        None, gt=0, description="performance is judged on the latest N labelled predictions, a window of its own "
        "(labels arrive late: the newest predictions usually have none yet); default: monitoring.window.rows, "
        "or 5000 with a time window")
    min_metric: float | None = Field(None, description="decay when the labelled metric of a window falls below this")
    max_drop: Tolerance = Field(
        "5%", description="decay when the labelled metric of a window is worse than the model's evaluation "
        "metric by more than this: a number (in the metric's units) or a percentage of the evaluation metric"
    )


class SkewSpec(_Strict):
    """Training-serving skew: a sample of logged requests replayed through the batch path (see
    everloop.monitor.replay_skew) must give the features and predictions the service gave."""

    sample_rows: int = Field(1000, ge=1, description="logged requests of the window replayed through the batch path")
    max_mismatch_share: float = Field(
        0.0, ge=0, le=1, description="skew when more than this share of replayed requests differ (0: any mismatch)"
    )
    tolerance: float = Field(
        1e-5, ge=0, description="largest difference of a probability (absolute) or regression value (relative) "
        "that is not a mismatch"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_drift(cls, data: object) -> object:
        # The old distribution checks (nulls, unseen categories, out-of-range values) measured drift.
        moved = [k for k in ("max_null_rate_change", "max_unseen_share", "max_out_of_range_share")
                 if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(
                f"{', '.join(moved)} moved to drift: new values, unseen categories and null rates are judged by "
                "monitoring.drift (p_value, min_effect, per-feature settings); remove them from monitoring.skew, "
                "which now replays logged requests (sample_rows, max_mismatch_share, tolerance)"
            )
        return data


class HealthSpec(_Strict):
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="health alert when more than this share of the service's requests (on any "
        "path) failed with a server error (5xx); 4xx answers are the client's and never count here")
    max_refused_rate: float = Field(
        0.2, ge=0, le=1, description="health alert when more than this share of prediction requests (/predict, "
        "/invocations, /v2/models/{name}/infer) were refused as bad input (4xx): callers sending what the model "
        "cannot take")
    max_latency_ms_p99: float | None = Field(
        None, gt=0, description="health alert when the 99th percentile of prediction latency (milliseconds, from "
        "the prediction log) is above this; none: latency is reported, never judged")
    min_requests: int = Field(
        100, ge=1, description="fewest requests (prediction requests for the refused rate, logged predictions for "
        "latency) a window needs before its health is judged; fewer: reported, not judged")


class MonitoringSpec(_Strict):
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(rows=5000))
    drift: DriftSpec = Field(default_factory=DriftSpec)
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec)
    skew: SkewSpec = Field(default_factory=SkewSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    min_labelled_rows: int = Field(50, ge=1, description="fewest labelled rows a window needs for a metric")
    min_rows: int = Field(50, ge=1, description="fewest predictions a window needs for any verdict on drift or "
                          "estimated performance; a smaller window is reported as not judged")
    alert_on: list[Literal["drift", "decay", "estimated_decay", "prediction_drift", "skew", "health"]] = Field(
        default_factory=lambda: ["drift", "decay", "estimated_decay", "prediction_drift", "skew", "health"],
        description="which signals raise an alert (exit 1 and the webhook); the others are reported only")
    webhook: WithSecrets | None = Field(
        None, description="URL that alerts are POSTed to as JSON (or EVERLOOP_WEBHOOK_URL); a key in it is best "
        "kept in the environment: https://hooks.example.com/x?token=${HOOK_TOKEN}")


class RetrainDataSpec(_Strict):
    # `from` is a Python keyword: the field is `from_`, written and shown as `from`
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_alias=True, validate_by_name=True,
                              serialize_by_alias=True)

    from_: Literal["feedback", "datasets"] = Field(
        "feedback", alias="from",
        description="where the new labelled rows come from: feedback (predictions labelled through /feedback "
        "or 'everloop feedback') or datasets (labelled dataset versions ingested after the production model's "
        "data, e.g. a batch user's file of labels: 'everloop ingest'); also what the performance and "
        "new_labels triggers read")
    recent_rows: int = Field(50000, gt=0, description="the latest N labelled rows (predictions, or rows of the new "
                             "datasets) are the new training data")
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
    strict: bool = Field(False, description="refuse (422) request rows with a category not seen in "
                         "training, a value outside the schema's range or a null where training had "
                         "none; off: answer them, with warnings in /predict's answer (a request opts "
                         "in with ?strict=true)")
    flask_compatible: bool = Field(False, description="/predict answers also carry the fields a client of the "
                                   "usual Flask tutorial service reads: \"status\": \"ok\" and \"prediction\": "
                                   "[the labels, in row order], beside everloop's own (see docs/from-flask.md)")


class RolloutSpec(_Strict):
    """How the loop puts a candidate that passed the gate live."""

    mode: Literal["direct", "shadow", "canary"] = Field(
        "direct", description="direct: all traffic at once; shadow: scored beside production, off the response "
        "path, then promoted when judged live; canary: answers steps of the traffic, stepped up when judged live")
    steps: list[float] = Field([10, 50, 100], min_length=1, description="canary: percent of traffic per step, "
                               "increasing, ending at 100")
    shadow_sample: float = Field(100, ge=0.01, le=100, description="shadow: percent of production's rows the "
                                 "candidate also scores")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[float]) -> list[float]:
        # 0.01: the service splits traffic in 10,000 buckets (a smaller share would answer no request)
        if any(not 0.01 <= s <= 100 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])) or steps[-1] != 100:
            raise ValueError("steps must be percents from 0.01 to 100, increasing, ending at 100 (e.g. [10, 50, 100])")
        return steps


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
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)

    @model_validator(mode="after")
    def _consistent(self) -> "ProjectSpec":
        if self.evaluation.split.by_time and not self.data.timestamp:
            raise ValueError("evaluation.split.by_time needs data.timestamp")
        # The target, id and timestamp have roles of their own: never features, so never listed under
        # features (an excluded target would otherwise be silently used as the label all the same).
        roles = {self.data.target: "target", self.data.id: "id", self.data.timestamp: "timestamp"}
        for key in ("numeric", "categorical", "datetime", "exclude"):
            listed = [name for name in getattr(self.features, key) or [] if name in roles]
            if listed:
                which = " and ".join(f"data.{roles[name]}" for name in listed)
                raise ValueError(f"features.{key} lists {listed}, which is {which}: the target, id and "
                                 f"timestamp are never features; remove {'it' if len(listed) == 1 else 'them'} "
                                 f"from features.{key}")
        if self.features.custom and ":" not in self.features.custom:
            raise ValueError(f"features.custom {self.features.custom!r}: expected 'module:callable'")
        return self
