"""WTForms forms: the one validation path for the HTML form and the JSON API."""
from __future__ import annotations

import math
from dataclasses import dataclass

from flask_wtf import FlaskForm
from werkzeug.datastructures import MultiDict
from wtforms import (BooleanField, FileField, FloatField, IntegerField, PasswordField, SelectChoice, SelectField,
                     StringField)
from wtforms.validators import InputRequired, Length, NumberRange, Optional, StopValidation

from flask import current_app

from .devices import device_memory, disk_free
from .extraction.capture_names import BUNDLED_MINILM, SITES
from . import training_config
from .models import ActivationSet
from .sae import architectures
from .training_config import Param
from .validation import Finding, blocking, validate_config

DEFAULT_ARCHITECTURE = training_config.BY_NAME["architecture"].default  # what a JSON body without one trains


def param_names(*, template: bool = False) -> list[str]:
    """The hyper-parameters' names in ``PARAMS`` order (``template``: those a template holds), read now."""
    return [p.name for p in training_config.PARAMS if p.template or not template]


def used_by(param: Param) -> str | None:
    """ "Used by JumpReLU only." for a value only some architectures use (``required_for``); None otherwise."""
    return architectures.used_by_hint(param.required_for) or None if param.required_for is not None else None


def field_attrs(param: Param) -> dict:
    """The input's extra attributes: a decimal keypad and any step for a real number; a placeholder
    where the parameter declares one."""
    attrs = {"step": "any", "inputmode": "decimal"} if param.type is float else {}
    return {**attrs, **({"placeholder": param.placeholder} if param.placeholder else {})}


@dataclass
class ParamGroup:
    """One fieldset of the training form: its key and legend (``training_config.GROUPS``) and its fields,
    each with its hint and input attributes, in ``PARAMS`` order."""

    key: str
    legend: str
    fields: list

    @property
    def has_errors(self) -> bool:
        return any(f.errors for f, _, _ in self.fields)


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
            low = f"greater than {_bound(self.min)}" if self.min_exclusive else f"at least {_bound(self.min)}"
            bounds = " and ".join(p for p in (
                low if self.min is not None else "",
                f"at most {_bound(self.max)}" if self.max is not None else "") if p)
            got = str(field.raw_data[0] if field.raw_data else value)
            got = got if len(got) <= 40 else f"{got[:20]}… ({len(got):,} characters)"
            raise StopValidation(self.message or f"Must be {bounds} (got {got}).")


def _bound(x) -> str:
    """A range's bound as people write it: 2,147,483,647 rather than 2.14748e+09; 0.1 and 1e-06 as they are."""
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 10_000 else f"{x:g}"


class RequiredFor(InputRequired):
    """Required when the form's architecture is one of ``architectures``; otherwise optional."""

    field_flags = {}

    def __init__(self, architectures: tuple[str, ...], message: str) -> None:
        super().__init__(message=message)
        self.architectures = architectures

    def __call__(self, form, field):
        if form.architecture.data in self.architectures:
            return super().__call__(form, field)
        if not field.raw_data or not str(field.raw_data[0]).strip():
            field.errors[:] = []
            field.data = None
            raise StopValidation()


class Parsed:
    """A free-text value its parser accepts; the parser's ValueError is the field's message."""

    def __init__(self, parse) -> None:
        self.parse = parse

    def __call__(self, form, field):
        try:
            self.parse(field.data)
        except ValueError as error:
            raise StopValidation(str(error)) from None


def required(message: str = "This field is required.") -> InputRequired:
    return InputRequired(message=message)


# What blocks a start with warnings, in each reader's terms: the form's box, the API's field.
ACKNOWLEDGE_IN_FORM = "There are warnings above: tick this box to start anyway, or change the settings."
ACKNOWLEDGE_IN_API = ("There are warnings (listed in \"findings\"): send \"acknowledge_warnings\": true to start "
                      "anyway, or change the settings.")


class TrainingForm(FlaskForm):
    """A training run's configuration. Field names are the API's and the database's.

    The hyper-parameters' fields are made from ``app.training_config.PARAMS`` (below the
    class); only the run's name and its source are declared here.
    """

    name = StringField("Run name", validators=[Optional(), Length(max=200)])
    source_id = SelectField("Activation source", coerce=int, validators=[required()])

    acknowledge_warnings = BooleanField(
        "Start anyway: I have read the warnings", default=False,
        description="Warnings describe predictable trouble; tick this to start regardless.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources = {s.id: s for s in ActivationSet.select().order_by(ActivationSet.id)}
        self.source_id.choices = [SelectChoice(s.id, s.describe()) for s in self.sources.values()]
        self.findings = []
        self.blocking_findings = []

    def param_groups(self) -> list[ParamGroup]:
        """The form's fieldsets drawn from the configuration: every ``Param`` in its group's, in ``PARAMS`` order."""
        groups = [ParamGroup(key, legend, []) for key, legend in training_config.GROUPS]
        by_key = {g.key: g for g in groups}
        for param in training_config.PARAMS:
            group = by_key.get(param.group, groups[-1])  # a key GROUPS does not name: the last fieldset
            group.fields.append((getattr(self, param.name), used_by(param), field_attrs(param)))
        return groups

    def preflight(self):
        """The validator's findings for the current input, if every field it reads parsed."""
        source = self.sources.get(self.source_id.data)
        needed = ("latent_dim", "learning_rate", "batch_size", "total_steps", "lr_warmup_steps",
                  "l1_warmup_steps", "target_l0")
        if source is None or any(getattr(self, n).data is None or getattr(self, n).errors for n in needed):
            return []  # a field that did not parse or is out of range: its own error says why
        # A value its own field rejected is not judged again: its error is the one finding about it.
        cfg = {name: None if getattr(self, name).errors else getattr(self, name).data for name in param_names()}
        from .work.resources import submission_room

        # The GPUs a worker may place the run on: refused only when none could ever hold it (a run that
        # lacks room now waits in the queue). With no GPU, the RAM free now.
        room = submission_room(current_app.config)
        memory = None if room is not None else device_memory(current_app.config.get("SAE_DEVICE", "auto"))
        try:
            return validate_config(cfg, source.stats(), room=room,
                                   free_memory_bytes=memory.free_bytes if memory else None,
                                   device=memory.device if memory else "",
                                   free_disk_bytes=disk_free(current_app.config["DATA_DIR"]))
        except (TypeError, ValueError, ZeroDivisionError):
            return []  # a field out of range; its own error says why

    def attach_findings(self, findings, *, with_errors: bool = False) -> None:
        """Give each field the findings that concern it (templates show them beside it).

        On a full page a field's errors are drawn by the field itself; the live hints
        (``with_errors``) replace only the findings boxes, so there each error, the field's
        own and the validator's, is a finding of level "error": what the submit would say.
        """
        self.findings = findings
        for field in self:
            mine = [f for f in findings if f.field == field.name]
            if with_errors:
                field.findings = [Finding("error", field.name, e) for e in field.errors
                                  if all(e != f.message for f in mine)] + mine
            else:
                field.findings = [f for f in mine if f.level != "error"]

    def first_render(self) -> None:
        """Findings for a form shown with values already in it (defaults, a template, a run, a source)."""
        if self.source_id.data is None and self.sources:
            self.source_id.data = next(iter(self.sources))
        self.attach_findings(self.preflight())

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
                    self.acknowledge_warnings.errors.append(ACKNOWLEDGE_IN_FORM)
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
        data = training_config.normalize({name: getattr(self, name).data for name in param_names()})
        data["name"] = (self.name.data or "").strip()
        data["source_id"] = self.source_id.data
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
    latent = form.latent_dim.data if not form.latent_dim.errors else None
    arch = architectures.find(form.architecture.data)
    if arch is None:
        return ok
    k = form.k.data if not form.k.errors else None
    if arch.uses("k") and latent is not None and k is not None and k > latent:
        form.k.errors.append(f"k must not exceed latent_dim ({latent:,}).")
        ok = False
    if latent is not None:
        values = {p.name: getattr(form, p.name).data for p in arch.params if not getattr(form, p.name).errors}
        problem = arch.check_form(latent, k, values)
        if problem is not None:
            getattr(form, problem[0]).errors.append(problem[1])
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
        names = param_names(template=True)
        config = training_config.normalize({name: getattr(self, name).data for name in names})
        return {name: config[name] for name in names}


# What a JSON body or an imported template may hold besides the hyper-parameters: (type, null accepted).
TRAINING_EXTRAS = {"name": (str, False), "source_id": (int, False), "acknowledge_warnings": (bool, False)}
TEMPLATE_EXTRAS = {"name": (str, True), "d_in": (int, True), "provenance": (str, True)}

# The mapping's messages, one set for the API and the templates' import.
UNKNOWN_FIELD = "Unknown field."
NOT_BOOLEAN = "Must be true or false."
NOT_NUMBER = "Must be a number."
NOT_STRING = "Must be a string."
NOT_NULL = "Must not be null."


def alias_conflict(name: str, alias: str) -> str:
    return f"{name} and its alias {alias} were both given with different values."


def json_to_formdata(payload: object, *, template: bool = False) -> tuple[MultiDict | None, dict[str, list[str]]]:
    """Map a JSON object onto the training form's fields (the API) or a template's (``template``: an import).

    The one mapping of JSON onto a form of hyper-parameters, read from ``training_config.PARAMS``:
    aliases are accepted; a key a script or an older file leaves out takes its default where that
    is always safe (``api_optional``, and the checkboxes); nulls where the architecture uses the
    value, wrong types, unknown keys and conflicting aliases are errors named by field. Returns
    ``(formdata, errors)``; ``formdata`` is None on errors that stop the mapping itself.
    """
    if not isinstance(payload, dict):
        if template:
            return None, {"_template": ["Each template must be a JSON object."]}
        return None, {"_body": ["Expected a JSON object with the training's fields."]}
    params = {p.name: p for p in training_config.PARAMS if p.template or not template}
    extras = TEMPLATE_EXTRAS if template else TRAINING_EXTRAS
    errors: dict[str, list[str]] = {}
    data = dict(payload)
    for param in params.values():
        for alias in param.aliases:
            if alias in data:
                value = data.pop(alias)
                if param.name in data and data[param.name] != value:
                    errors.setdefault(param.name, []).append(alias_conflict(param.name, alias))
                else:
                    data[param.name] = value
    if not template:
        data.setdefault("name", "")
    for param in params.values():  # a checkbox left out keeps its default (in HTML, absent means off)
        if param.name not in data and (param.api_optional or param.type is bool):
            data[param.name] = param.default
    architecture = data.get("architecture", DEFAULT_ARCHITECTURE)
    formdata = MultiDict()
    for key, value in data.items():
        param = params.get(key)
        kind, null_ok = (param.type, False) if param is not None else extras.get(key, (None, False))
        if kind is None:
            errors.setdefault(key, []).append(UNKNOWN_FIELD)
        elif kind is bool:
            if not isinstance(value, bool):
                errors.setdefault(key, []).append(NOT_BOOLEAN)
            elif value:
                formdata[key] = "y"
        elif value is None:
            if not (null_ok or (param is not None and not param.applies_to(architecture))):
                errors.setdefault(key, []).append((param and param.null_message) or NOT_NULL)
        elif isinstance(value, (bool, dict, list)):
            errors.setdefault(key, []).append(NOT_NUMBER if kind in (int, float) else NOT_STRING)
        else:
            if isinstance(value, float) and value.is_integer() and kind is int:
                value = int(value)
            formdata[key] = str(value)
    return formdata, errors


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
    structure = SelectField("Structure", default="independent", validators=[Optional()], choices=[
        SelectChoice("independent", "Independent features, uniform frequencies (easy)"),
        SelectChoice("hierarchical", "Hierarchy, correlated firing and Zipfian frequencies (hard, after SynthSAEBench)")])

    def validate(self, extra_validators=None) -> bool:
        ok = super().validate(extra_validators)
        if ok and self.mean_active.data > self.n_features.data:
            self.mean_active.errors.append("Must not exceed the number of features.")
            ok = False
        if ok and self.structure.data == "hierarchical" and (self.n_features.data < 4
                                                             or self.mean_active.data > self.n_features.data / 4):
            self.mean_active.errors.append("A hierarchical source needs at least 4 features and at most a quarter "
                                           "of them active per token.")
            ok = False
        return ok


def param_field(param: Param):
    """The form field for one hyper-parameter: its label, default, help and range check."""
    if param.type is bool:
        return BooleanField(param.label, default=param.default, description=param.help)
    if param.parse is not None:
        return StringField(param.label, default=param.default, description=param.help,
                           validators=[Optional(), Length(max=200), Parsed(param.parse)])
    if param.required_for is None:
        presence = required()
    else:
        presence = RequiredFor(param.required_for, param.required_message or "This field is required.")
    if param.choices is not None:
        return SelectField(param.label, choices=[SelectChoice(v, text) for v, text in param.choices],
                           default=param.default, validators=[presence], description=param.help)
    kind = IntegerField if param.type is int else FloatField
    return kind(param.label, default=param.default, description=param.help,
                validators=[presence, Range(param.min, param.max, min_exclusive=param.min_exclusive)])


_PARAM_FIELDS: dict[type, list[str]] = {}


def rebuild() -> None:
    """Make the hyper-parameters' form fields, and the stored columns, from ``training_config.PARAMS``.

    The training form gets every hyper-parameter and the template form its share: one set of
    rules. Runs at import; a test that changes ``PARAMS`` calls it again (and after).
    """
    from .models import sync_param_columns

    for form_class in (TrainingForm, TemplateForm):
        for name in _PARAM_FIELDS.pop(form_class, []):
            delattr(form_class, name)
    for param in training_config.PARAMS:
        unbound = param_field(param)
        setattr(TrainingForm, param.name, unbound)
        _PARAM_FIELDS.setdefault(TrainingForm, []).append(param.name)
        if param.template:
            setattr(TemplateForm, param.name, unbound)
            _PARAM_FIELDS.setdefault(TemplateForm, []).append(param.name)
    sync_param_columns()


rebuild()


class ExtractionForm(FlaskForm):
    """What to extract: model, layer and site; from which corpus; how much, and how stored."""

    model_size_bytes: int | None = None  # the model's weight files, measured by ``validate`` (None: unknown)

    name = StringField("Name", validators=[Optional(), Length(max=200)],
                       description="Optional; the activation source is named after model, layer and site otherwise.")
    model_name = StringField("Model", default=BUNDLED_MINILM, validators=[InputRequired("Name a model."), Length(max=500)],
                             description=f"A Hugging Face Hub name (e.g. gpt2, EleutherAI/pythia-70m), a folder under "
                                         f"this app's model folders written by save_pretrained, or {BUNDLED_MINILM} (a 6-layer BERT encoder that "
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
                               description="A Hub name (read from the local cache when offline) or a folder under this "
                                           "app's dataset folders written by Dataset.save_to_disk.")
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

    def check_layers(self, n_layers: int | None) -> bool:
        """The layer is one the model has (``n_layers``: its count, when its configuration says)."""
        if n_layers is not None and self.layer.data is not None and not self.layer.errors \
                and self.layer.data >= n_layers:
            self.layer.errors.append(f"Out of range: the model has {n_layers} layers (0 to {n_layers - 1}).")
            return False
        return True

    def validate(self, extra_validators=None) -> bool:
        from .extraction.hub import ModelNameError, layer_count, max_positions, model_config

        from .paths import PathRefused, resolve
        from .work.resources import TooLarge, check_model_size, check_submission, model_need

        ok = super().validate(extra_validators)
        if not self.model_name.errors and self.model_name.data:
            try:
                name = self.model_name.data.strip()
                resolved = name if name == BUNDLED_MINILM else resolve(name, current_app.config, "model")
                config = model_config(resolved)
                if name != BUNDLED_MINILM:  # its size is kept for placement (Extraction.model_size_bytes)
                    self.model_size_bytes = check_model_size(current_app.config, resolved)
                    if self.model_size_bytes and not self.model_dtype.errors:  # beyond every GPU: never runs
                        check_submission(current_app.config, model_need(self.model_size_bytes, self.model_dtype.data),
                                         "The model", "Choose bfloat16, or a smaller model.")
            except (ModelNameError, PathRefused, TooLarge) as exc:
                self.model_name.errors.append(str(exc))
                return False
            ok = self.check_layers(layer_count(config) if config else None) and ok
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
        elif self.text_kind.data == "hf":
            try:
                resolve(self.dataset_name.data, current_app.config, "dataset")
            except PathRefused as exc:
                self.dataset_name.errors.append(str(exc))
                ok = False
        if self.text_kind.data in ("file", "hf") and not (self.text_column.data or "").strip():
            self.text_column.errors.append("Name the column that holds the text.")
            ok = False
        return ok


class StreamForm(ExtractionForm):
    """A streamed source: the model, the layers and site it is read at, the corpus, and the mixing
    buffer. Nothing is stored: every run on it runs the model as it trains."""

    layer = None
    token_budget = None
    dtype = None
    layers = StringField("Layers", default="0-5", validators=[InputRequired("Name the layers, e.g. 0-5."), Length(max=300)],
                         description="Block indices from 0: a range (0-5), a list (1,3,5) or one (3). One forward pass "
                                     "captures them all; each SAE reads one (its hook point, e.g. 3.resid).")
    buffer_tokens = IntegerField("Mixing buffer (tokens)", default=65_536, validators=[required(), Range(1_024, 16_777_216)],
                                 description="Activations are shuffled within rounds of this many tokens before the "
                                             "SAEs see them; two rounds per layer are held (memory shown below).")

    def check_layers(self, n_layers: int | None) -> bool:
        from .work.streams import StreamRefused, parse_layers

        if self.layers.errors or not self.layers.data:
            return False
        try:
            parse_layers(self.layers.data, n_layers)
        except StreamRefused as exc:
            self.layers.errors.append(str(exc))
            return False
        return True


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


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[InputRequired("Enter your username."), Length(max=64)])
    password = PasswordField("Password", validators=[InputRequired("Enter your password."), Length(max=1000)])

    def validate_username(self, field):
        # no user can have such a name (see auth.create_user), and a NUL would not even reach PostgreSQL
        if not all(c.isalnum() or c in "._-@" for c in (field.data or "").strip()):
            raise StopValidation("A username is 1 to 64 letters, digits or . _ - @.")


class UserForm(FlaskForm):
    """An admin adds a team member; the password is generated when left empty and shown once."""

    username = StringField("Username", validators=[InputRequired("Name the user."), Length(max=64)])
    password = PasswordField("Password (empty: generate one)", validators=[Optional(), Length(min=10, max=1000)])
    is_admin = BooleanField("Admin (may change anyone's records and add users)", default=False)


class PasswordChangeForm(FlaskForm):
    """Every user changes their own password; the current one is asked for first."""

    current_password = PasswordField("Current password", validators=[InputRequired("Enter your current password."),
                                                                      Length(max=1000)])
    new_password = PasswordField("New password", validators=[
        InputRequired("Enter a new password."),
        Length(min=10, max=1000, message="A password needs 10 to 1000 characters.")],
        description="At least 10 characters; a few unrelated words are easy to remember and hard to guess.")
    confirm_password = PasswordField("New password again", validators=[InputRequired("Type the new password again.")])

    def validate_confirm_password(self, field):
        if self.new_password.data and field.data != self.new_password.data:
            raise StopValidation("The two new passwords differ.")


class TokenForm(FlaskForm):
    name = StringField("Token name", validators=[InputRequired("Name the token, e.g. the script using it."),
                                                 Length(max=100)])
