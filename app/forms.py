"""WTForms forms: the one validation path for the HTML form and the JSON API."""
from __future__ import annotations

import math

from flask_wtf import FlaskForm
from werkzeug.datastructures import MultiDict
from wtforms import BooleanField, FileField, FloatField, IntegerField, SelectChoice, SelectField, StringField
from wtforms.validators import InputRequired, Length, NumberRange, Optional, StopValidation

from flask import current_app

from .devices import device_memory
from .extraction.capture_names import BUNDLED_MINILM, SITES
from .models import ActivationSet
from .quality import L1_ALPHA_MAX, L1_ALPHA_MIN_EXCLUSIVE
from .validation import SourceStats, blocking, validate_config

L1_ALPHA_ALIASES = ("sparsity_coefficient", "l1_coefficient")


class Range(NumberRange):
    """``NumberRange`` that can exclude its lower bound, with a message naming the value."""

    def __init__(self, min=None, max=None, *, min_exclusive: bool = False, message: str | None = None):
        super().__init__(min=min, max=max, message=message)
        self.min_exclusive = min_exclusive

    def __call__(self, form, field):
        value = field.data
        too_low = value is not None and self.min is not None and (
            value <= self.min if self.min_exclusive else value < self.min)
        too_high = value is not None and self.max is not None and value > self.max
        if value is None or (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:
            low = f"greater than {self.min:g}" if self.min_exclusive else f"at least {self.min:g}"
            bounds = " and ".join(p for p in (
                low if self.min is not None else "",
                f"at most {self.max:g}" if self.max is not None else "") if p)
            raise StopValidation(self.message or f"Must be {bounds} (got {field.raw_data[0] if field.raw_data else value}).")


class RequiredFor(InputRequired):
    """Required when the form's architecture is ``architecture``; otherwise optional."""

    field_flags = {}

    def __init__(self, architecture: str, message: str) -> None:
        super().__init__(message=message)
        self.architecture = architecture

    def __call__(self, form, field):
        if form.architecture.data == self.architecture:
            return super().__call__(form, field)
        if not field.raw_data or not str(field.raw_data[0]).strip():
            field.errors[:] = []
            field.data = None
            raise StopValidation()


def required(message: str = "This field is required.") -> InputRequired:
    return InputRequired(message=message)


class TrainingForm(FlaskForm):
    """A training run's configuration. Field names are the API's and the database's."""

    name = StringField("Run name", validators=[Optional(), Length(max=200)])
    source_id = SelectField("Activation source", coerce=int, validators=[required()])
    architecture = SelectField(
        "Architecture", choices=[SelectChoice("standard", "Standard (ReLU + L1 penalty)"),
                                 SelectChoice("topk", "TopK (exactly k active)")],
        default="standard", validators=[required()])
    latent_dim = IntegerField(
        "Latents (latent_dim)", default=1024, validators=[required(), Range(16, 1_048_576)],
        description="Number of SAE features; usually 4× to 64× the activation width d_in.")
    l1_alpha = FloatField(
        "Sparsity penalty (l1_alpha)", default=0.003,
        validators=[RequiredFor("standard", "The sparsity penalty l1_alpha is required for a standard SAE; "
                                            "without it the features come out dense. 0.003 is a sound start."),
                    Range(L1_ALPHA_MIN_EXCLUSIVE, L1_ALPHA_MAX, min_exclusive=True)],
        description="Weight of the L1 term that makes features sparse. Higher → fewer active latents. "
                    "Not the learning rate. Range: above 0.00001, at most 0.1.")
    k = IntegerField(
        "Active latents per token (k)", default=32,
        validators=[RequiredFor("topk", "k is required for a TopK SAE."), Range(1, 65_536)],
        description="TopK only: exactly k latents fire for every token.")
    learning_rate = FloatField(
        "Learning rate (optimizer step size)", default=0.001, validators=[required(), Range(1e-6, 0.1)],
        description="Adam's step size. Not the sparsity penalty. Typical: 0.0001 to 0.001.")
    batch_size = IntegerField("Batch size (tokens per step)", default=512, validators=[required(), Range(16, 65_536)])
    total_steps = IntegerField("Training steps", default=2000, validators=[required(), Range(10, 10_000_000)])
    lr_warmup_steps = IntegerField(
        "Learning-rate warm-up steps", default=100, validators=[required(), Range(0, 10_000_000)],
        description="The learning rate rises linearly from 0 over these steps.")
    l1_warmup_steps = IntegerField(
        "Sparsity warm-up steps", default=200, validators=[required(), Range(0, 10_000_000)],
        description="l1_alpha rises linearly from 0 over these steps.")
    target_l0 = FloatField(
        "Target L0 (fraction of latents)", default=0.02,
        validators=[required(), Range(0, 0.5, min_exclusive=True)],
        description="The share of latents you want active per token; 0.01–0.05 is typical.")
    seed = IntegerField("Random seed", default=0, validators=[required(), Range(0, 2**31 - 1)])
    log_every = IntegerField("Log metrics every (steps)", default=20, validators=[required(), Range(1, 10_000)])
    dead_window_tokens = IntegerField(
        "Dead-latent window (tokens)", default=200_000, validators=[required(), Range(1_000, 1_000_000_000)],
        description="A latent that has not fired in this many tokens counts as dead.")

    early_stop = BooleanField(
        "Stop early if still dense", default=True,
        description="End the run as 'stopped early' if L0 is still above the threshold at the given step.")
    early_stop_step = IntegerField("Early-stop check at step", default=1000,
                                   validators=[required(), Range(1, 10_000_000)])
    early_stop_l0 = FloatField("Early-stop L0 threshold (fraction)", default=0.20,
                               validators=[required(), Range(0, 1, min_exclusive=True)])
    steer_l1_alpha = BooleanField(
        "Steer l1_alpha to hit the target L0", default=False,
        description="After the sparsity warm-up, adjust l1_alpha within its valid range so L0 settles at the "
                    "target. The l1_alpha you set is the starting point.")
    dead_latent_remedy = SelectField(
        "Dead-latent remedy (standard SAE)",
        choices=[SelectChoice("none", "None"),
                 SelectChoice("resample", "Resample: point dead latents at badly reconstructed inputs")],
        default="none", validators=[required()])
    plateau_window = IntegerField(
        "Plateau window (steps)", default=2000, validators=[required(), Range(10, 10_000_000)],
        description="Warn when the loss has not improved for this many steps.")

    NUMERIC_FIELDS = ("latent_dim", "l1_alpha", "k", "learning_rate", "batch_size", "total_steps",
                      "lr_warmup_steps", "l1_warmup_steps", "target_l0", "seed", "log_every",
                      "dead_window_tokens", "early_stop_step", "early_stop_l0", "plateau_window")
    BOOLEAN_FIELDS = ("early_stop", "steer_l1_alpha")
    # Settings a script may leave out of a JSON body: their defaults are safe. The
    # hyperparameters (l1_alpha above all) must always be given.
    API_DEFAULTED = ("name", "log_every", "dead_window_tokens", "early_stop_step", "early_stop_l0",
                     "plateau_window", "dead_latent_remedy")
    CHOICE_FIELDS = ("name", "source_id", "architecture", "dead_latent_remedy")

    acknowledge_warnings = BooleanField(
        "Start anyway: I have read the warnings", default=False,
        description="Warnings describe predictable trouble; tick this to start regardless.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources = {s.id: s for s in ActivationSet.select().order_by(ActivationSet.id)}
        self.source_id.choices = [SelectChoice(s.id, s.describe()) for s in self.sources.values()]
        self.findings = []
        self.blocking_findings = []

    def preflight(self):
        """The validator's findings for the current input, if every field it reads parsed."""
        source = self.sources.get(self.source_id.data)
        needed = ("latent_dim", "learning_rate", "batch_size", "total_steps", "lr_warmup_steps",
                  "l1_warmup_steps", "target_l0")
        if source is None or any(getattr(self, n).data is None for n in needed):
            return []
        cfg = {name: getattr(self, name).data for name in (*self.NUMERIC_FIELDS, "architecture")}
        memory = device_memory(current_app.config.get("SAE_DEVICE", "auto"))
        try:
            return validate_config(cfg, SourceStats(source.d_in, source.n_tokens, source.name),
                                   free_memory_bytes=memory.free_bytes, device=memory.device)
        except (TypeError, ValueError, ZeroDivisionError):
            return []  # a field out of range; its own error says why

    def attach_findings(self, findings) -> None:
        """Give each field the findings that concern it (templates show them beside it)."""
        self.findings = findings
        for field in self:
            field.findings = [f for f in findings if f.field == field.name and f.level != "error"]

    def validate(self, extra_validators=None) -> bool:
        ok = self.validate_fields(extra_validators)
        if ok:
            self.attach_findings(self.preflight())
            self.blocking_findings = blocking(self.findings, acknowledged=bool(self.acknowledge_warnings.data))
            for finding in self.findings:
                if finding.level == "error":
                    getattr(self, finding.field).errors.append(finding.message)
            if self.blocking_findings:
                ok = False
                if any(f.level == "warning" for f in self.blocking_findings):
                    self.acknowledge_warnings.errors.append(
                        "There are warnings above: tick this box to start anyway, or change the settings.")
        return ok

    def validate_fields(self, extra_validators=None) -> bool:
        """Field and cross-field rules only, without the validator (live hints use this too)."""
        ok = super().validate(extra_validators)
        ok = check_cross_fields(self) and ok
        source = self.sources.get(self.source_id.data)
        if source is not None and source.n_tokens is not None and not self.batch_size.errors \
                and self.batch_size.data is not None and self.batch_size.data > source.n_tokens:
            self.batch_size.errors.append(f"The source holds only {source.n_tokens:,} training tokens.")
            ok = False
        return ok

    def training_fields(self) -> dict:
        """The validated values to store on a new Training row."""
        data = {name: getattr(self, name).data
                for name in (*self.CHOICE_FIELDS, *self.NUMERIC_FIELDS, *self.BOOLEAN_FIELDS)}
        data["name"] = (data["name"] or "").strip()
        if data["architecture"] == "standard":
            data["k"] = None
        else:
            data["l1_alpha"] = None
            data["steer_l1_alpha"] = False
            data["dead_latent_remedy"] = "none"  # TopK always has AuxK
        return data


def check_cross_fields(form) -> bool:
    """Rules between fields: warm-ups within the run, k within the latents. Marks the field."""
    ok = True
    steps = form.total_steps.data if not form.total_steps.errors else None
    if steps is not None:
        for f in (form.lr_warmup_steps, form.l1_warmup_steps):
            if not f.errors and f.data is not None and f.data > steps:
                f.errors.append(f"Must not exceed the training steps ({steps:,}).")
                ok = False
    if form.architecture.data == "topk" and not form.k.errors and not form.latent_dim.errors \
            and form.k.data is not None and form.latent_dim.data is not None and form.k.data > form.latent_dim.data:
        form.k.errors.append(f"k must not exceed latent_dim ({form.latent_dim.data:,}).")
        ok = False
    return ok


class TemplateForm(FlaskForm):
    """A template's name and hyperparameters, validated exactly as the training form's."""

    name = StringField("Template name", validators=[InputRequired("Give the template a name."), Length(max=200)])
    d_in = IntegerField("Made for activation width (d_in)", validators=[Optional(), Range(1, 1_000_000)])
    provenance = StringField("Provenance", validators=[Optional(), Length(max=2000)],
                             description="Where these values come from, for whoever uses the template next.")

    def validate(self, extra_validators=None) -> bool:
        ok = super().validate(extra_validators)
        return check_cross_fields(self) and ok

    def template_config(self) -> dict:
        from .models import TEMPLATE_FIELDS

        config = {name: getattr(self, name).data for name in TEMPLATE_FIELDS}
        if config["architecture"] == "standard":
            config["k"] = None
        else:
            config["l1_alpha"] = None
        return config


def json_to_formdata(payload: object) -> tuple[MultiDict | None, dict[str, list[str]]]:
    """Map a JSON body onto the training form's fields.

    Aliases of ``l1_alpha`` are accepted; nulls, unknown keys and conflicting aliases are
    errors named by field. Returns ``(formdata, errors)``; ``formdata`` is None on errors
    that stop the mapping itself.
    """
    if not isinstance(payload, dict):
        return None, {"_body": ["Expected a JSON object with the training's fields."]}
    errors: dict[str, list[str]] = {}
    data = dict(payload)
    given_aliases = [a for a in L1_ALPHA_ALIASES if a in data]
    for alias in given_aliases:
        value = data.pop(alias)
        if "l1_alpha" in data and data["l1_alpha"] != value:
            errors.setdefault("l1_alpha", []).append(
                f"l1_alpha and its alias {alias} were both given with different values.")
        else:
            data["l1_alpha"] = value
    known = set(TrainingForm.NUMERIC_FIELDS) | set(TrainingForm.CHOICE_FIELDS)
    formdata = MultiDict()
    for key in TrainingForm.API_DEFAULTED:
        if key not in data:
            data[key] = getattr(TrainingForm, key).kwargs.get("default", "")
    for key in (*TrainingForm.BOOLEAN_FIELDS, "acknowledge_warnings"):
        # A checkbox that is absent means False in HTML; in JSON an absent key keeps the default.
        value = data.pop(key, getattr(TrainingForm, key).kwargs.get("default", False))
        if not isinstance(value, bool):
            errors.setdefault(key, []).append("Must be true or false.")
        elif value:
            formdata[key] = "y"
    for key, value in data.items():
        if key not in known:
            errors.setdefault(key, []).append("Unknown field.")
            continue
        if value is None:
            unused = (key == "l1_alpha" and data.get("architecture") == "topk") or \
                     (key == "k" and data.get("architecture", "standard") == "standard")
            if not unused:
                errors.setdefault(key, []).append(NULL_MESSAGES.get(key, "Must not be null."))
            continue
        if isinstance(value, (bool, dict, list)):
            errors.setdefault(key, []).append("Must be a number." if key in TrainingForm.NUMERIC_FIELDS
                                               else "Must be a string.")
            continue
        if isinstance(value, float) and value.is_integer() and key in _INTEGER_FIELDS:
            value = int(value)
        formdata[key] = str(value)
    return formdata, errors


NULL_MESSAGES = {
    "l1_alpha": "Must not be null: the sparsity penalty l1_alpha is required for a standard SAE "
                "(without it the features come out dense); 0.003 is a sound start.",
}

_INTEGER_FIELDS = {"latent_dim", "k", "batch_size", "total_steps", "lr_warmup_steps", "l1_warmup_steps",
                   "seed", "log_every", "dead_window_tokens", "source_id", "early_stop_step", "plateau_window"}


class UploadForm(FlaskForm):
    """An activation file: .npy, .safetensors or .pt holding a 2-D float array."""

    name = StringField("Name", validators=[Optional(), Length(max=200)])
    file = FileField("Activation file (.npy, .safetensors or .pt)", validators=[InputRequired("Choose a file to upload.")])


class SyntheticSourceForm(FlaskForm):
    """A synthetic source with known ground-truth features."""

    d_in = IntegerField("Width (d_in)", default=256, validators=[required(), Range(2, 16_384)])
    n_features = IntegerField("Ground-truth features", default=512, validators=[required(), Range(1, 1_000_000)])
    mean_active = FloatField("Mean active features per token", default=5.0,
                             validators=[required(), Range(0, 1_000, min_exclusive=True)])
    seed = IntegerField("Seed", default=0, validators=[required(), Range(0, 2**31 - 1)])

    def validate(self, extra_validators=None) -> bool:
        ok = super().validate(extra_validators)
        if ok and self.mean_active.data > self.n_features.data:
            self.mean_active.errors.append("Must not exceed the number of features.")
            ok = False
        return ok


def _share_template_fields() -> None:
    """TemplateForm takes the training form's own field definitions: one set of rules."""
    from .models import TEMPLATE_FIELDS

    for name in TEMPLATE_FIELDS:
        setattr(TemplateForm, name, getattr(TrainingForm, name))


_share_template_fields()


def template_formdata(payload: object) -> tuple[MultiDict | None, dict[str, list[str]]]:
    """Map one imported template (JSON object) onto the template form, aliases included."""
    from .models import TEMPLATE_FIELDS

    if not isinstance(payload, dict):
        return None, {"_template": ["Each template must be a JSON object."]}
    errors: dict[str, list[str]] = {}
    data = dict(payload)
    for alias in L1_ALPHA_ALIASES:
        if alias in data:
            value = data.pop(alias)
            if "l1_alpha" in data and data["l1_alpha"] != value:
                errors.setdefault("l1_alpha", []).append(f"l1_alpha and its alias {alias} disagree.")
            data["l1_alpha"] = value
    if data.get("architecture", "standard") == "standard" and data.get("l1_alpha") is None:
        errors.setdefault("l1_alpha", []).append(NULL_MESSAGES["l1_alpha"])
    formdata = MultiDict()
    for key, value in data.items():
        if key not in (*TEMPLATE_FIELDS, "name", "d_in", "provenance"):
            errors.setdefault(key, []).append("Unknown field.")
        elif value is None or value == "":
            continue
        elif isinstance(value, (bool, dict, list)):
            errors.setdefault(key, []).append("Wrong type.")
        else:
            formdata[key] = str(value)
    return formdata, errors


class ExtractionForm(FlaskForm):
    """What to extract: model, layer and site; from which corpus; how much, and how stored."""

    name = StringField("Name", validators=[Optional(), Length(max=200)],
                       description="Optional; the activation source is named after model, layer and site otherwise.")
    model_name = StringField("Model", default=BUNDLED_MINILM, validators=[InputRequired("Name a model."), Length(max=500)],
                             description=f"A Hugging Face Hub name (e.g. gpt2, EleutherAI/pythia-70m), a local folder "
                                         f"written by save_pretrained, or {BUNDLED_MINILM} (a 6-layer BERT encoder that "
                                         "ships with the app: no download).")
    layer = IntegerField("Layer", default=3, validators=[required(), Range(0, 1000)],
                         description="Block index, from 0.")
    site = SelectField("Site", choices=[SelectChoice(k, v) for k, v in SITES.items()], default="resid")
    text_kind = SelectField("Text", default="stdlib", choices=[
        SelectChoice("stdlib", "Python standard library docstrings (offline, on any machine)"),
        SelectChoice("file", "An uploaded file (.txt, .jsonl, .csv or .parquet)"),
        SelectChoice("hf", "A Hugging Face dataset")])
    text_file = FileField("Text file", description=".txt: documents separated by blank lines; .jsonl, .csv and "
                                                   ".parquet: one document per record, in the text column.")
    dataset_name = StringField("Dataset", validators=[Optional(), Length(max=500)],
                               description="A Hub name (read from the local cache when offline) or a folder written "
                                           "by Dataset.save_to_disk.")
    dataset_split = StringField("Split", default="train", validators=[Optional(), Length(max=100)])
    text_column = StringField("Text column", default="text", validators=[Optional(), Length(max=200)])
    token_budget = IntegerField("Tokens to extract", default=200_000, validators=[required(), Range(1_024, 2_000_000_000)])
    context_length = IntegerField("Context length", default=128, validators=[required(), Range(8, 8192)],
                                  description="Tokens per window, special tokens included; longer documents are cut "
                                              "into several windows.")
    batch_size = IntegerField("Batch size (windows)", default=32, validators=[required(), Range(1, 1024)])
    dtype = SelectField("Stored as", default="float32", choices=[
        SelectChoice("float32", "float32"), SelectChoice("float16", "float16 (half the disk; refused if values overflow)")])
    model_dtype = SelectField("Model precision", default="float32", choices=[
        SelectChoice("float32", "float32 (exact; 4 bytes per parameter)"),
        SelectChoice("bfloat16", "bfloat16 (half the memory: large models on one GPU)"),
        SelectChoice("float16", "float16 (half the memory)")],
        description="The weights' precision while the model runs; activations are stored as chosen above.")
    exclude_special = BooleanField("Leave out special tokens (BOS, CLS, SEP)", default=True)

    def validate(self, extra_validators=None) -> bool:
        from .extraction.hub import ModelNameError, layer_count, max_positions, model_config

        ok = super().validate(extra_validators)
        if not self.model_name.errors and self.model_name.data:
            try:
                config = model_config(self.model_name.data)
            except ModelNameError as exc:
                self.model_name.errors.append(str(exc))
                return False
            layers = layer_count(config) if config else None
            if layers is not None and self.layer.data is not None and not self.layer.errors \
                    and self.layer.data >= layers:
                self.layer.errors.append(f"Out of range: the model has {layers} layers (0 to {layers - 1}).")
                ok = False
            longest = max_positions(config) if config else None
            if longest is not None and self.context_length.data is not None and not self.context_length.errors \
                    and self.context_length.data > longest:
                self.context_length.errors.append(f"The model reads at most {longest:,} tokens at a time.")
                ok = False
        if self.text_kind.data == "file" and not getattr(self.text_file.data, "filename", None):
            self.text_file.errors.append("Choose a text file to upload.")
            ok = False
        if self.text_kind.data == "hf" and not (self.dataset_name.data or "").strip():
            self.dataset_name.errors.append("Name a dataset (a Hub name or a save_to_disk folder).")
            ok = False
        if self.text_kind.data in ("file", "hf") and not (self.text_column.data or "").strip():
            self.text_column.errors.append("Name the column that holds the text.")
            ok = False
        return ok


class FeatureJobForm(FlaskForm):
    """How many tokens the feature statistics are computed on."""

    sample_tokens = IntegerField("Tokens to sample", default=50_000, validators=[required(), Range(1_000, 5_000_000)])


class ImportSAEForm(FlaskForm):
    """An SAE in the SAELens layout (a zip of cfg.json and sae_weights.safetensors) and where to browse it."""

    name = StringField("Name", validators=[Optional(), Length(max=200)])
    file = FileField("SAE (.zip holding cfg.json and sae_weights.safetensors)",
                     validators=[InputRequired("Choose a zip to upload.")])
    source_id = SelectField("Browse its features on", coerce=int, validators=[required()])
    sample_tokens = IntegerField("Tokens to sample", default=50_000, validators=[required(), Range(1_000, 5_000_000)])

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source_id.choices = [SelectChoice(s.id, s.describe())
                                  for s in ActivationSet.select().order_by(ActivationSet.id)]
