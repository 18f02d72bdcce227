use super::*;

#[test]
fn median_and_spread_by_hand() {
    assert_eq!(median_spread(&[3.0, 1.0, 2.0]), (2.0, 3.0));
    assert_eq!(median_spread(&[4.0, 1.0, 2.0, 2.0]), (2.0, 4.0));
    assert_eq!(median_spread(&[5.0]), (5.0, 1.0));
    assert_eq!(median_spread(&[]), (0.0, 1.0));
}

#[test]
fn others_are_the_busy_time_not_ours_over_all_cores() {
    let stat = |user: u64, system: u64, idle: u64, steal: u64| {
        format!("cpu  {user} 0 {system} {idle} 5 0 0 {steal} 0 0\ncpu0 1 2 3 4\n")
    };
    let own = |utime: u64, stime: u64| {
        format!("42 (a (weird) name) R 1 2 3 4 5 6 7 8 9 10 {utime} {stime} 0 0 20 0 2")
    };
    assert_eq!(parse_loadavg("1.36 1.54 2.47 1/109 15581"), Some(1.36));
    let a = parse_cpu(&stat(100, 50, 1000, 0)).unwrap();
    assert_eq!(
        a,
        CpuTimes {
            total: 1155,
            busy: 150
        }
    );
    assert_eq!(parse_own(&own(30, 10)), Some(40));
    // 200 ticks of 2 cores pass (400 in all), 180 of them busy: we used 120, others 40 and the
    // hypervisor stole 20, so others took (180 − 120) / 400 = 0.15 of the machine.
    let start = LoadProbe {
        loadavg: 0.5,
        cpu: a,
        own: 40,
    };
    let b = parse_cpu(&stat(100 + 130, 50 + 30, 1000 + 220, 20)).unwrap();
    let end = LoadProbe {
        loadavg: 1.7,
        cpu: b,
        own: 160,
    };
    let load = load_between(&start, &end);
    assert_eq!((load.loadavg_before, load.loadavg_after), (0.5, 1.7));
    assert!((load.others - 60.0 / 400.0).abs() < 1e-12, "{load:?}");
    assert!(load.under_load());
    assert_eq!(
        load.note().unwrap(),
        "under load: others took 15% of the CPU (load average 0.50 → 1.70)"
    );
    // Only our own work: nothing to mark.
    let quiet = LoadProbe {
        own: 40 + 180,
        ..end
    };
    assert_eq!(load_between(&start, &quiet).others, 0.0);
    assert!(load_between(&start, &quiet).note().is_none());
    assert!(parse_cpu("intr 1 2").is_none() && parse_own("no parens").is_none());
    // This machine has a /proc: a probe reads it.
    if std::path::Path::new("/proc/stat").exists() {
        let probe = LoadProbe::start().unwrap();
        let load = probe.finish().unwrap();
        assert!((0.0..=1.0).contains(&load.others));
    }
}
