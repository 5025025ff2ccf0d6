//! `bench-ipvs`: how long the `ipvs` library takes to create N services × M destinations and
//! to dump them back, on the kernel it runs on (the lab VM, via `scripts/bench ipvs`), then to
//! create them again through `IpvsBatch` (`batch_*`: `--batch` requests per sendmsg). Prints
//! one JSON object. A benchmark, not a test: it asserts nothing but that the kernel took it.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use futures::StreamExt;
use ipvs::{Destination, IpvsHandle, Service, ServiceKey};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250) as u8 + 1))
}

fn backend(i: usize, j: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        244,
        (i % 250) as u8,
        (j * 25 + i / 250 % 25) as u8 + 1,
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let services = arg("--services", 10_000);
    let dests = arg("--destinations", 10);
    let concurrency = arg("--concurrency", 64);
    let h = IpvsHandle::connect().await?;
    h.flush().await?;
    let svc: Vec<Service> = (0..services)
        .map(|i| Service::new(ServiceKey::tcp(vip(i), 80 + (i / 62_500) as u16), "rr"))
        .collect();

    let t0 = Instant::now();
    let results: Vec<_> = futures::stream::iter(svc.iter().map(|s| h.add_service(s)))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let t_services = t0.elapsed();
    let adds = svc
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..dests).map(move |j| (s.key, Destination::new(backend(i, j), 8080))));
    let results: Vec<_> = futures::stream::iter(adds.map(|(k, d)| {
        let h = h.clone();
        async move { h.add_destination(&k, &d).await }
    }))
    .buffer_unordered(concurrency)
    .collect()
    .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let t_create = t0.elapsed();

    let t1 = Instant::now();
    let listed = h.services().await?;
    let t_dump_services = t1.elapsed();
    let mut n_dests = 0;
    for s in &listed {
        n_dests += h.destinations(&s.key).await?.len();
    }
    let t_dump = t1.elapsed();
    if listed.len() != services || n_dests != services * dests {
        return Err(format!("dumped {} services / {n_dests} destinations", listed.len()).into());
    }
    let t2 = Instant::now();
    h.flush().await?;
    let t_flush = t2.elapsed();

    // The same objects again through batches (IpvsBatch: `--batch` requests per sendmsg, only
    // failures and each batch's last request answered), then flushed.
    let per_send = arg("--batch", 128);
    // In a network namespace of their own: the flush above left every destination in IPVS's
    // trash (ip_vs_dest_trash, kept for minutes), which every destination add walks, O(n)
    // each: 100,000 destinations took 187 s on 6.1 here.
    // SAFETY: unshare(2) with CLONE_NEWNET only moves the calling thread (this runtime's only
    // one) into a new namespace, where the batch socket is then opened.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // Its loopback up gives it a local routing table: IPVS refuses a destination whose
    // address type the namespace cannot tell.
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !up.success() {
        return Err("ip link set lo up failed in the batch namespace".into());
    }
    let mut batch = h.batch(per_send)?;
    let t3 = Instant::now();
    if let Some((_, e)) = batch
        .apply(svc.iter().map(ipvs::Change::AddService))
        .into_iter()
        .next()
    {
        return Err(e.into());
    }
    let t_batch_services = t3.elapsed();
    let dest_list: Vec<(ServiceKey, Destination)> = svc
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..dests).map(move |j| (s.key, Destination::new(backend(i, j), 8080))))
        .collect();
    let dest_changes = dest_list
        .iter()
        .map(|(k, d)| ipvs::Change::AddDestination(k, d));
    if let Some((_, e)) = batch.apply(dest_changes).into_iter().next() {
        return Err(e.into());
    }
    let t_batch = t3.elapsed();

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let ops = services * (1 + dests);
    println!(
        "{}",
        serde_json::json!({
            "kernel": release.trim(),
            "services": services,
            "destinations_per_service": dests,
            "concurrency": concurrency,
            "create_services_s": t_services.as_secs_f64(),
            "create_total_s": t_create.as_secs_f64(),
            "create_ops_per_s": ops as f64 / t_create.as_secs_f64(),
            "dump_services_s": t_dump_services.as_secs_f64(),
            "dump_total_s": t_dump.as_secs_f64(),
            "flush_s": t_flush.as_secs_f64(),
            "batch": per_send,
            "batch_create_services_s": t_batch_services.as_secs_f64(),
            "batch_create_total_s": t_batch.as_secs_f64(),
        })
    );
    Ok(())
}
