//! What the generator sends: request bodies drawn over `acct-0` … `acct-{N-1}` with a
//! Zipf-like account popularity, prepared before the run so the hot loop only clones bytes.
//! Nothing here touches the network.

use bytes::Bytes;
use std::fmt::Write as _;

/// Which endpoint a request goes to; the summary counts each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Check,
    Batch,
    Meter,
    Entitlements,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// `/v1/check` only: allowed and denied, with and without user, region and device.
    Check,
    /// 80% check, 5% batch of 100, 10% meter, 5% entitlements.
    Mix,
    /// `/v1/check/batch` only, `--batch-size` checks per request.
    Batch,
    /// `/v1/meter` only, every event with its own id (with `--data-dir` each one waits for
    /// the durable log).
    Meter,
}

/// splitmix64: small, deterministic, good enough to pick test data.
#[derive(Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Account popularity: rank r is drawn with weight 1/(r+1)^s, and ranks are scattered over
/// the account ids so the popular accounts are not simply the first ones.
#[derive(Debug)]
pub struct Zipf {
    cdf: Vec<f64>,
    n_accounts: u64,
}

impl Zipf {
    pub fn new(n_accounts: u64, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n_accounts as usize);
        let mut total = 0.0;
        for rank in 0..n_accounts {
            total += 1.0 / ((rank + 1) as f64).powf(exponent);
            cdf.push(total);
        }
        for value in &mut cdf {
            *value /= total;
        }
        Zipf { cdf, n_accounts }
    }

    pub fn account_idx(&self, random: &mut SplitMix) -> u64 {
        let u = random.unit();
        let rank = self.cdf.partition_point(|&value| value < u) as u64;
        // A multiplier coprime with any N that is not a multiple of this prime.
        (rank.min(self.n_accounts.saturating_sub(1)) * 2_654_435_761) % self.n_accounts.max(1)
    }
}

/// Prepared bodies for a run.
#[derive(Debug)]
pub struct Workload {
    pub scenario: Scenario,
    checks: Vec<Bytes>,
    batches: Vec<Bytes>,
    pub batch_size: usize,
    mix_batch_size: usize,
    mix_batches: Vec<Bytes>,
    entitlement_paths: Vec<String>,
    meter_accounts: Vec<u64>,
    run_id: u64,
}

const POOL: usize = 16_384;
const BATCH_POOL: usize = 32;
const MIX_BATCH: usize = 100;
const REGIONS: [&str; 3] = ["us", "eu", "apac"];
const METERS: [&str; 3] = ["api_calls", "exports", "storage_gb"];

fn check_json(text: &mut String, zipf: &Zipf, n_features: u64, random: &mut SplitMix) {
    // One check in a hundred names an account the snapshot does not hold.
    if random.below(100) == 0 {
        let _ = write!(text, r#"{{"account":"acct-missing-{}""#, random.below(1000));
    } else {
        let _ = write!(text, r#"{{"account":"acct-{}""#, zipf.account_idx(random));
    }
    let feature_idx = random.below(n_features);
    let _ = write!(text, r#","feature":"feature-{feature_idx}""#);
    // Generated accounts have users user-0..user-2 and devices dev-0..dev-1; ask for one more
    // than exists now and then so unknown users and devices are denied too.
    if random.below(2) == 0 {
        let _ = write!(text, r#","user":"user-{}""#, random.below(4));
    }
    if random.below(10) < 3 {
        let _ = write!(text, r#","region":"{}""#, REGIONS.get(random.below(3) as usize).copied().unwrap_or("us"));
    }
    if random.below(5) == 0 {
        let _ = write!(text, r#","device":"dev-{}""#, random.below(3));
    }
    if feature_idx == 1 || feature_idx == 2 {
        let _ = write!(text, r#","amount":{}"#, 1 + random.below(3));
    }
    text.push('}');
}

fn batch_json(size: usize, zipf: &Zipf, n_features: u64, random: &mut SplitMix) -> Bytes {
    let mut text = String::with_capacity(size * 90 + 16);
    text.push_str(r#"{"checks":["#);
    for check_idx in 0..size {
        if check_idx > 0 {
            text.push(',');
        }
        check_json(&mut text, zipf, n_features, random);
    }
    text.push_str("]}");
    Bytes::from(text)
}

impl Workload {
    pub fn new(scenario: Scenario, n_accounts: u64, n_features: u64, zipf_exponent: f64, batch_size: usize, seed: u64) -> Workload {
        let zipf = Zipf::new(n_accounts.max(1), zipf_exponent);
        let mut random = SplitMix::new(seed);
        let mut checks = Vec::with_capacity(POOL);
        for _ in 0..POOL {
            let mut text = String::with_capacity(128);
            check_json(&mut text, &zipf, n_features, &mut random);
            checks.push(Bytes::from(text));
        }
        let batches = match scenario {
            Scenario::Batch => (0..BATCH_POOL).map(|_| batch_json(batch_size, &zipf, n_features, &mut random)).collect(),
            _ => Vec::new(),
        };
        let mix_batches = match scenario {
            Scenario::Mix => (0..BATCH_POOL).map(|_| batch_json(MIX_BATCH, &zipf, n_features, &mut random)).collect(),
            _ => Vec::new(),
        };
        let entitlement_paths = (0..1024)
            .map(|_| {
                let mut path = format!("/v1/entitlements/acct-{}", zipf.account_idx(&mut random));
                if random.below(2) == 0 {
                    let _ = write!(path, "?user=user-{}", random.below(3));
                }
                path
            })
            .collect();
        let meter_accounts = (0..4096).map(|_| zipf.account_idx(&mut random)).collect();
        let run_id =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(seed);
        Workload {
            scenario,
            checks,
            batches,
            batch_size,
            mix_batch_size: MIX_BATCH,
            mix_batches,
            entitlement_paths,
            meter_accounts,
            run_id,
        }
    }

    /// The `idx`-th request of the run: kind, method is implied by kind, path and body.
    pub fn request(&self, idx: u64) -> (Kind, &str, Bytes) {
        let pick = |pool: &Vec<Bytes>| pool.get((idx as usize) % pool.len().max(1)).cloned().unwrap_or_default();
        match self.scenario {
            Scenario::Check => (Kind::Check, "/v1/check", pick(&self.checks)),
            Scenario::Batch => (Kind::Batch, "/v1/check/batch", pick(&self.batches)),
            Scenario::Meter => self.meter_request(idx),
            Scenario::Mix => {
                // A fixed pattern over 20 slots keeps the mix exact over any whole second.
                let mut random = SplitMix::new(idx ^ self.run_id);
                match idx % 20 {
                    0 => (Kind::Batch, "/v1/check/batch", pick(&self.mix_batches)),
                    1 | 11 => self.meter_request(idx),
                    7 => {
                        let path = self
                            .entitlement_paths
                            .get((random.next() as usize) % self.entitlement_paths.len().max(1))
                            .map(String::as_str)
                            .unwrap_or("/v1/entitlements/acct-0");
                        (Kind::Entitlements, path, Bytes::new())
                    }
                    _ => (Kind::Check, "/v1/check", pick(&self.checks)),
                }
            }
        }
    }

    /// One metering event with an id unique to this run and slot.
    fn meter_request(&self, idx: u64) -> (Kind, &'static str, Bytes) {
        let mut random = SplitMix::new(idx ^ self.run_id);
        let account_idx = self.meter_accounts.get((random.next() as usize) % self.meter_accounts.len().max(1)).copied().unwrap_or(0);
        let meter = METERS.get(random.below(3) as usize).copied().unwrap_or("api_calls");
        let body = format!(r#"{{"account":"acct-{account_idx}","meter":"{meter}","amount":1,"id":"load-{}-{idx}"}}"#, self.run_id);
        (Kind::Meter, "/v1/meter", Bytes::from(body))
    }

    /// Decisions one successful request of this kind stands for.
    pub fn decisions(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Check => 1,
            Kind::Batch if self.scenario == Scenario::Batch => self.batch_size as u64,
            Kind::Batch => self.mix_batch_size as u64,
            Kind::Meter | Kind::Entitlements => 0,
        }
    }
}
