//! Runs a lab until stdin closes (or Enter), for poking at it by hand:
//! `cargo run -p palisade-kubelab --example lab`, then `kubectl --kubeconfig PATH ...`.

use palisade_kubelab::{KubeLab, Options};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let lab = KubeLab::start(Options::default()).await?;
    println!("started in {:.1?}", started.elapsed());
    println!("apiserver  {}", lab.url());
    println!("kubeconfig {}", lab.kubeconfig().display());
    println!("logs       {}", lab.dir().join("logs").display());
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}
