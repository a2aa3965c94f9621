#[tokio::main]
async fn main() -> anyhow::Result<()> {
    berth_controller::main().await
}
