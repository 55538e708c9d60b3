//! `morgana-agent inventory`: the hardware and OS facts the agent reports.

pub fn run(json: bool) -> anyhow::Result<()> {
    let inv = crate::inventory::collect(&crate::inventory::root());
    if json {
        println!("{}", serde_json::to_string_pretty(&inv)?);
        return Ok(());
    }
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    println!("hostname  {}", or_dash(&inv.hostname));
    println!("vendor    {}", or_dash(&inv.vendor));
    println!("model     {}", or_dash(&inv.model));
    println!("serial    {}", or_dash(&inv.serial));
    println!("cpu       {} × {}", inv.cpu_count, or_dash(&inv.cpu_model));
    println!("memory    {} MiB", inv.memory_bytes >> 20);
    println!(
        "os        {} ({} {})",
        or_dash(&inv.os_name),
        inv.os_id,
        inv.os_version
    );
    println!("kernel    {}", or_dash(&inv.kernel));
    for d in &inv.disks {
        println!(
            "disk      {} {} ({} GB)",
            d.name,
            or_dash(&d.model),
            d.size_bytes / 1_000_000_000
        );
    }
    for n in &inv.network {
        println!(
            "network   {} {} {}",
            n.name,
            or_dash(&n.mac),
            n.addresses.join(" ")
        );
    }
    for p in &inv.pci {
        println!("pci       {:04x}:{:04x}", p.vendor_id, p.device_id);
    }
    Ok(())
}
