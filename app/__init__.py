"""SAE Studio: train sparse autoencoders that come out sparse the first time.

The web stack is imported inside ``create_app`` only, so the ML core (``app.sae``,
``app.extraction``) imports with torch and numpy alone, e.g. on a bare GPU box.
"""
from __future__ import annotations


def create_app(config: dict | None = None):
    """Build the web app. ``config`` overrides settings read from the environment."""
    import click
    from flask import Flask
    from flask_wtf.csrf import CSRFProtect
    from htmx_flask import Htmx

    from .config import ROOT, data_dir_exposure, load_settings
    from .db import database, migrate, open_database

    app = Flask(__name__, template_folder=str(ROOT / "templates"), static_folder=str(ROOT / "static"))
    settings = load_settings(config)
    app.config.update(settings)
    app.config["WTF_CSRF_TIME_LIMIT"] = None
    exposed = data_dir_exposure(settings["DATA_DIR"])
    if exposed:  # loud, and again on every page an admin opens (see formatting.admin_banners)
        app.logger.warning("WARNING: %s", exposed)

    open_database(settings["DATABASE_URL"], settings["SQLITE_BUSY_TIMEOUT_MS"])
    with database.connection_context():
        migrate()

    @app.before_request
    def _open_db():
        database.connect(reuse_if_open=True)

    @app.teardown_request
    def _close_db(exc):
        if not database.is_closed():
            database.close()

    from . import security

    security.install_body_limits(app)  # before CSRFProtect, whose hook reads the form
    csrf = CSRFProtect(app)
    Htmx(app)

    from .views import api, auth, extractions, features, pages, sources, sweeps, templates, tune, workers
    from .views.formatting import register_filters

    security.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(sources.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(tune.bp)
    app.register_blueprint(templates.bp)
    app.register_blueprint(extractions.bp)
    app.register_blueprint(features.bp)
    app.register_blueprint(workers.bp)
    app.register_blueprint(sweeps.bp)
    csrf.exempt(api.bp)
    register_filters(app)

    from . import static_files

    static_files.install(app)  # scripts and styles fetched once per browser, not once per page

    @app.cli.command("init-db")
    def init_db_command():
        """Apply pending migrations."""
        with database.connection_context():
            click.echo(f"schema version {migrate()}")

    return app
