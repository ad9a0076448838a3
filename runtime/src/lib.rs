//! What every cryopod binary does at its edges: JSON logs, exit codes, the
//! Prometheus endpoint and its certificate's validity there. Shared by the agent and
//! the operator, which share no other code but the agent API's.

pub mod certificate;
pub mod process;

/// Serves what `render` returns as OpenMetrics text on `/metrics` (the operator's
/// metrics too).
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
