//! The synthetic workload: people browsing, identifying and ordering.
//!
//! Everything but the send time is drawn from one seeded generator, so a
//! seed names one exact stream of events (bodies, keys, message ids and
//! order). Each person has 1–3 devices (anonymous ids) and 1–6 sessions; a
//! session is a page view and 1–5 product views (categories and products
//! from skewed, Zipf-like distributions), sometimes an identify (user id +
//! email; on a second device too for some people, which merges the two
//! devices' profiles) and sometimes an order (revenue from a log-normal
//! distribution: a long tail of big baskets). People overlap in time: the
//! next event comes from a random one of `concurrent` active people.

use std::collections::VecDeque;

use rand::rngs::Xoshiro256PlusPlus;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};

/// Categories, most popular first (drawn with Zipf weights).
pub const CATEGORIES: &[&str] = &[
    "shoes", "bags", "hats", "coats", "shirts", "dresses", "jeans", "socks", "watches", "scarves",
    "belts", "gloves",
];
const PRODUCTS_PER_CATEGORY: usize = 200;
const CAMPAIGNS: &[&str] = &["news", "ads", "social", "email", "partner"];
/// Share of people who identify in one of their sessions.
const IDENTIFY_SHARE: f64 = 0.6;
/// Share of identified people with 2+ devices who identify on a second one.
const SECOND_DEVICE_SHARE: f64 = 0.4;
/// Chance that a session ends with an order.
const ORDER_SHARE: f64 = 0.3;
/// Order revenue: log-normal with this median and log-spread.
const REVENUE_MEDIAN: f64 = 60.0;
const REVENUE_SIGMA: f64 = 1.1;

/// What to generate.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub seed: u64,
    /// Distinct people (the stream ends when all are done).
    pub people: u64,
    /// People active at once (whose events interleave).
    pub concurrent: usize,
}

/// One event ready to send, without its `timestamp` (the sender stamps the
/// send time).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The Kafka key a producer writing `<p>.raw` uses: the anonymous id.
    pub key: String,
    pub body: Value,
}

/// Counts of what was generated.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WorkloadStats {
    pub events: u64,
    pub page_views: u64,
    pub product_views: u64,
    pub identifies: u64,
    /// Identifies on a person's second device: each merges two profiles.
    pub second_device_identifies: u64,
    pub orders: u64,
    pub revenue: f64,
    pub people_started: u64,
    pub devices: u64,
    /// Profiles identity should end with for the events generated so far:
    /// one per identified person plus one per device used but never
    /// identified.
    pub expected_profiles: u64,
}

/// Zipf-like weights `1 / (k + 1)^s` as a cumulative table.
struct Skewed {
    cumulative: Vec<f64>,
}

impl Skewed {
    fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (0..n)
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(s);
                total
            })
            .collect();
        Skewed { cumulative }
    }

    fn sample(&self, rng: &mut Xoshiro256PlusPlus) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|c| *c <= u)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// One person's remaining steps and what identity will make of them.
struct Person {
    steps: VecDeque<Event>,
    /// Bit per device: used so far / identified so far.
    used: u8,
    identified: u8,
    /// Device bit of each remaining step, to track `used`/`identified`.
    step_devices: VecDeque<(u8, bool)>,
}

impl Person {
    fn profiles(&self) -> u64 {
        let unidentified_used = (self.used & !self.identified).count_ones() as u64;
        u64::from(self.identified != 0) + unidentified_used
    }
}

/// An endless-until-`people` iterator of events.
pub struct Workload {
    spec: WorkloadSpec,
    rng: Xoshiro256PlusPlus,
    categories: Skewed,
    products: Skewed,
    active: Vec<Person>,
    next_person: u64,
    stats: WorkloadStats,
    /// Profiles of people already done.
    retired_profiles: u64,
}

impl Workload {
    pub fn new(spec: WorkloadSpec) -> Self {
        let rng = Xoshiro256PlusPlus::seed_from_u64(spec.seed);
        let mut w = Workload {
            rng,
            categories: Skewed::new(CATEGORIES.len(), 1.1),
            products: Skewed::new(PRODUCTS_PER_CATEGORY, 1.0),
            active: Vec::with_capacity(spec.concurrent),
            next_person: 0,
            stats: WorkloadStats::default(),
            retired_profiles: 0,
            spec,
        };
        while w.active.len() < w.spec.concurrent.max(1) && w.next_person < w.spec.people {
            w.start_person();
        }
        w
    }

    pub fn stats(&self) -> WorkloadStats {
        let mut s = self.stats.clone();
        s.expected_profiles =
            self.retired_profiles + self.active.iter().map(Person::profiles).sum::<u64>();
        s
    }

    fn start_person(&mut self) {
        let i = self.next_person;
        self.next_person += 1;
        let person = self.journey(i);
        self.stats.people_started += 1;
        self.active.push(person);
    }

    /// Draw one person's whole journey.
    fn journey(&mut self, i: u64) -> Person {
        let seed = self.spec.seed;
        let rng = &mut self.rng;
        let devices = match rng.random::<f64>() {
            u if u < 0.5 => 1,
            u if u < 0.85 => 2,
            _ => 3,
        };
        self.stats.devices += devices as u64;
        let anon: Vec<String> = (0..devices).map(|d| format!("a{seed}-{i}-{d}")).collect();
        let user = format!("u{seed}-{i}");
        let sessions = 1 + (0..5).take_while(|_| rng.random_bool(0.5)).count();
        let identify_at = rng
            .random_bool(IDENTIFY_SHARE)
            .then(|| rng.random_range(0..sessions));
        let campaign = CAMPAIGNS[rng.random_range(0..CAMPAIGNS.len())];
        // The second device identifies in one extra session at the end.
        let second = identify_at.is_some() && devices > 1 && rng.random_bool(SECOND_DEVICE_SHARE);
        let mut steps = Vec::new();
        let mut known = [false; 3];
        let total_sessions = sessions + usize::from(second);
        for s in 0..total_sessions {
            let is_second = second && s == sessions;
            let device = match (s, is_second) {
                (_, true) => {
                    // Any device but the one that identified first.
                    let first = known.iter().position(|k| *k).unwrap_or(0);
                    let d = rng.random_range(0..devices - 1);
                    if d >= first {
                        d + 1
                    } else {
                        d
                    }
                }
                (0, _) => 0,
                _ => rng.random_range(0..devices),
            };
            let ids = |known: &[bool; 3]| {
                let mut ids = json!({"anonymousId": anon[device]});
                if known[device] {
                    ids["userId"] = json!(user);
                }
                ids
            };
            let category = CATEGORIES[self.categories.sample(rng)];
            let mut page = ids(&known);
            page["type"] = json!("page");
            page["name"] = json!("Category");
            page["properties"] = json!({"category": category, "path": format!("/c/{category}")});
            if s == 0 {
                page["context"] = json!({"campaign": {"source": campaign}});
            }
            steps.push((device, false, page));
            let views = rng.random_range(1..=5);
            let mut last_category = category;
            for _ in 0..views {
                let category = if rng.random_bool(0.7) {
                    last_category
                } else {
                    CATEGORIES[self.categories.sample(rng)]
                };
                last_category = category;
                let sku = format!("{category}-{}", self.products.sample(rng));
                let price = (rng.random_range(500..20_000) as f64) / 100.0;
                let mut view = ids(&known);
                view["type"] = json!("track");
                view["event"] = json!("Product Viewed");
                view["properties"] = json!({"sku": sku, "category": category, "price": price});
                steps.push((device, false, view));
            }
            if identify_at == Some(s) || is_second {
                known[device] = true;
                let mut identify = ids(&known);
                identify["type"] = json!("identify");
                identify["traits"] = json!({"email": format!("{user}@example.com")});
                steps.push((device, true, identify));
            }
            if rng.random_bool(ORDER_SHARE) {
                let z = standard_normal(rng);
                let revenue = (REVENUE_MEDIAN * (REVENUE_SIGMA * z).exp() * 100.0).round() / 100.0;
                let mut order = ids(&known);
                order["type"] = json!("track");
                order["event"] = json!("Order Completed");
                order["properties"] = json!({"revenue": revenue, "currency": "USD",
                                             "order_id": format!("o{seed}-{i}-{s}")});
                steps.push((device, false, order));
            }
        }
        let mut person = Person {
            steps: VecDeque::with_capacity(steps.len()),
            used: 0,
            identified: 0,
            step_devices: VecDeque::with_capacity(steps.len()),
        };
        for (device, identifies, body) in steps {
            let key = anon[device].clone();
            person.step_devices.push_back((1 << device, identifies));
            person.steps.push_back(Event { key, body });
        }
        person
    }

    fn count(&mut self, body: &Value, second_identify: bool) {
        let s = &mut self.stats;
        s.events += 1;
        match (body["type"].as_str(), body["event"].as_str()) {
            (Some("page"), _) => s.page_views += 1,
            (Some("identify"), _) => {
                s.identifies += 1;
                if second_identify {
                    s.second_device_identifies += 1;
                }
            }
            (_, Some("Product Viewed")) => s.product_views += 1,
            (_, Some("Order Completed")) => {
                s.orders += 1;
                s.revenue += body["properties"]["revenue"].as_f64().unwrap_or(0.0);
            }
            _ => {}
        }
    }
}

impl Iterator for Workload {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if self.active.is_empty() {
                return None;
            }
            let slot = self.rng.random_range(0..self.active.len());
            let person = &mut self.active[slot];
            let (Some(mut event), Some((bit, identifies))) =
                (person.steps.pop_front(), person.step_devices.pop_front())
            else {
                // Done: retire, and start the next person in its place.
                let done = self.active.swap_remove(slot);
                self.retired_profiles += done.profiles();
                if self.next_person < self.spec.people {
                    self.start_person();
                }
                continue;
            };
            let second_identify = identifies && person.identified != 0;
            person.used |= bit;
            if identifies {
                person.identified |= bit;
            }
            event.body["messageId"] = json!(format!("m{}-{}", self.spec.seed, self.stats.events));
            self.count(&event.body, second_identify);
            return Some(event);
        }
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut Xoshiro256PlusPlus) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
