"""Prometheus metrics with vLLM's names and buckets under a `tokensift:` prefix.

Each app owns its registry, so several apps (tests, Ray Serve replicas in one process) never clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM v1 (vllm/v1/metrics/loggers.py) bucket boundaries.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]  # fmt: skip
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
P = "tokensift:"


class ServeMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def hist(name: str, doc: str, buckets: list[float]) -> Histogram:
            return Histogram(P + name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(P + name, doc, labels, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time waiting for the KV pool.", REQUEST_BUCKETS)
        self.prefill_time = hist("request_prefill_time_seconds", "Prefill time.", REQUEST_BUCKETS)
        self.decode_time = hist("request_decode_time_seconds", "Decode time.", REQUEST_BUCKETS)
        self.running = gauge("num_requests_running", "Requests generating now.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for the KV pool.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV pool reserved fraction; 1 means full.")
        self.kv_reserved = gauge("kv_pool_reserved_bytes", "Bytes reserved in the KV pool.")
        self.kv_held = gauge("kv_pool_held_bytes", "KV bytes the running requests' caches hold now.")
        self.kv_capacity = gauge("kv_pool_capacity_bytes", "KV pool size in bytes.")
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prefill tokens.", labels, registry=r).labels(
            model_name
        )
        self.generation_tokens = Counter(
            P + "generation_tokens", "Generated tokens.", labels, registry=r
        ).labels(model_name)
        self.success = Counter(
            P + "request_success", "Finished requests.", [*labels, "finished_reason"], registry=r
        )
        self.by_method = Counter(
            P + "requests_by_method", "Requests run, by method family.", [*labels, "method"], registry=r
        )
        self.guard = Counter(P + "guard_stops", "Requests ended by a guard.", [*labels, "guard"], registry=r)
        self.rejected = Counter(
            P + "requests_rejected", "Requests refused.", [*labels, "status", "reason"], registry=r
        )
        self.reservation_exceeded = Counter(
            P + "kv_reservation_exceeded",
            "Requests whose measured KV peak exceeded their reservation (the estimate was low).",
            labels,
            registry=r,
        ).labels(model_name)

    def reject(self, status: int, reason: str) -> None:
        self.rejected.labels(self.model_name, str(status), reason).inc()
