"""The running gateway's parts, built once and shared by the routes (`request.app.state.runtime`): admission
and drain (gateway/serving/admission.py), the model catalog (gateway/admin/catalog.py), the health report
(gateway/health/report.py), the Responses API's store, and the engine with its observer."""

from __future__ import annotations

from gateway.admin.catalog import ModelCatalog
from gateway.health.engine_events import MetricsObserver
from gateway.health.report import HealthReporter
from gateway.responses.store import ResponseStore
from gateway.serving.admission import Admission
from gateway.settings import Settings
from mlx_backend.client.engine import Engine
from mlx_backend.registry import ModelRegistry


class GatewayRuntime:
    def __init__(
        self, settings: Settings, engine: Engine, registry: ModelRegistry, observer: MetricsObserver | None = None
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.observer = observer or MetricsObserver()
        self.admission = Admission(settings, engine)
        self.catalog = ModelCatalog(settings, engine, registry, self.admission)
        self.health = HealthReporter(settings, engine, self.admission, self.catalog)
        self.responses = ResponseStore(int(settings.responses_store_mb * 1024 * 1024))  # Responses API
