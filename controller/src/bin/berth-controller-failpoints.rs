//! The controller with failpoints compiled in (feature `failpoints`), for the crash tests only: FAILPOINTS names
//! the points that fire (controller/tests/crash.rs).
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_controller::main().await
}
