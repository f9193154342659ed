// @tollgate/sdk: the Tollgate client for Node 18+. It moves JSON to and from the sidecar's
// HTTP API (global fetch, no runtime dependencies) and decides nothing itself; the only
// answers it makes up are fallbacks when the sidecar cannot be reached, marked `fallback: true`.

import { randomBytes } from "node:crypto";

export const VERSION = "0.2.0";

/** Why a decision came out as it did; `ok` is the only allow. `unavailable` marks a fallback. */
export type Reason =
  | "ok"
  | "unknown_account"
  | "account_suspended"
  | "unknown_feature"
  | "license_expired"
  | "not_entitled"
  | "not_in_rollout"
  | "region_blocked"
  | "unknown_user"
  | "no_seat"
  | "role_forbidden"
  | "device_not_activated"
  | "quota_exceeded"
  | "unavailable";

export const REASONS: readonly Reason[] = [
  "ok",
  "unknown_account",
  "account_suspended",
  "unknown_feature",
  "license_expired",
  "not_entitled",
  "not_in_rollout",
  "region_blocked",
  "unknown_user",
  "no_seat",
  "role_forbidden",
  "device_not_activated",
  "quota_exceeded",
  "unavailable",
];

export interface CheckRequest {
  account: string;
  feature: string;
  user?: string;
  region?: string;
  device?: string;
  /** Units of the feature's meter this use would consume; 1 when absent. */
  amount?: number;
}

/** The cheapest purchase that would turn a denial into an allow. */
export interface Upgrade {
  kind: "plan" | "addon";
  id: string;
  /** Where the account buys it: the catalog's `checkout_url` with the account and the plan's or
   * add-on's id filled in; absent when the plan or add-on has no checkout link. */
  checkout_url?: string;
}

export interface Decision {
  allow: boolean;
  reason: Reason;
  /** Snapshot revision decided on; absent on a fallback. */
  revision?: number;
  license?: string;
  meter?: string;
  limit?: number;
  used?: number;
  remaining?: number;
  reset_at?: string;
  expires_at?: string;
  grace?: boolean;
  overage?: boolean;
  stale?: boolean;
  upgrade?: Upgrade;
  /** True only for an answer made up because the sidecar could not be asked. */
  fallback: boolean;
}

export interface MeterRequest {
  account: string;
  meter: string;
  amount: number;
  /** Idempotency id; generated (128 random bits, hex) when absent and reused by retries. */
  id?: string;
  /** RFC 3339, when the usage happened if not now. */
  timestamp?: string;
}

export interface MeterResult {
  accepted: boolean;
  duplicate: boolean;
  used: number;
  limit?: number;
  remaining?: number;
  reset_at?: string;
  reason?: string;
  period_start: string;
  durable: boolean;
  revision: number;
  /** The idempotency id the event was sent under. */
  id: string;
}

export interface FeatureEntitlement {
  feature: string;
  allow: boolean;
  reason: Reason;
  upgrade: Upgrade | null;
}

export interface Entitlements {
  account: string;
  status: "active" | "suspended";
  revision: number;
  stale: boolean;
  licenses: Array<Record<string, unknown>>;
  features: FeatureEntitlement[];
  meters: Array<Record<string, unknown>>;
  [key: string]: unknown;
}

/** What `check` and `batch` answer when the sidecar is unreachable, too slow or failing. */
export type Fallback = "deny" | "allow" | "error";

export interface ClientOptions {
  /** Base URL of the sidecar; default http://127.0.0.1:8181. */
  baseUrl?: string;
  /** Longest wait for one attempt, in ms; default 500. */
  timeoutMs?: number;
  /** Further attempts after an unavailable answer; default 2. */
  retries?: number;
  /** First wait between attempts, in ms, doubling; default 25. */
  retryBackoffMs?: number;
  /** Default "deny": fail closed. Metering and entitlements never fall back. */
  fallback?: Fallback;
  /** A fetch implementation (tests, proxies); default the global fetch. */
  fetch?: typeof fetch;
}

/** An error answer or a transport failure; `unavailable` says whether a retry may help. */
export class TollgateError extends Error {
  readonly status: number | undefined;
  readonly code: string;
  readonly unavailable: boolean;

  constructor(message: string, code: string, status: number | undefined, unavailable: boolean) {
    super(message);
    this.name = "TollgateError";
    this.code = code;
    this.status = status;
    this.unavailable = unavailable;
  }
}

/** A fresh idempotency id: 128 random bits in hex. */
export function newEventId(): string {
  return randomBytes(16).toString("hex");
}

function fallbackDecision(allow: boolean): Decision {
  return { allow, reason: allow ? "ok" : "unavailable", fallback: true };
}

function toDecision(wire: Record<string, unknown>): Decision {
  const reason = wire["reason"];
  if (typeof reason !== "string" || !REASONS.includes(reason as Reason)) {
    throw new TollgateError(`the answer names unknown reason \`${String(reason)}\``, "unknown_reason", undefined, false);
  }
  return { ...(wire as unknown as Decision), fallback: false };
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

export class TollgateClient {
  readonly baseUrl: string;
  private readonly timeoutMs: number;
  private readonly retries: number;
  private readonly retryBackoffMs: number;
  private readonly fallback: Fallback;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ClientOptions = {}) {
    const baseUrl = (options.baseUrl ?? "http://127.0.0.1:8181").replace(/\/+$/, "");
    if (!/^https?:\/\/[^/]+/.test(baseUrl)) {
      throw new TollgateError(`\`${baseUrl}\` is not an http(s) base URL`, "invalid_url", undefined, false);
    }
    this.baseUrl = baseUrl;
    this.timeoutMs = options.timeoutMs ?? 500;
    this.retries = options.retries ?? 2;
    this.retryBackoffMs = options.retryBackoffMs ?? 25;
    this.fallback = options.fallback ?? "deny";
    this.fetchImpl = options.fetch ?? globalThis.fetch;
  }

  /** May `account` use `feature`? A denial carries `reason` and, where one exists, `upgrade`. */
  async check(request: CheckRequest): Promise<Decision> {
    return this.orFallback(
      async () => toDecision(await this.call("POST", "/v1/check", request)),
      () => fallbackDecision(this.fallback === "allow"),
    );
  }

  /** Many checks in one request, answered in order. */
  async batch(requests: CheckRequest[]): Promise<Decision[]> {
    return this.orFallback(
      async () => {
        const answer = await this.call("POST", "/v1/check/batch", { checks: requests });
        const results = answer["results"];
        if (!Array.isArray(results)) {
          throw new TollgateError("the batch answer has no `results`", "invalid_answer", undefined, false);
        }
        return results.map((result) => toDecision(result as Record<string, unknown>));
      },
      () => requests.map(() => fallbackDecision(this.fallback === "allow")),
    );
  }

  /** Records usage. The id is generated once when absent, so a retry cannot count twice. */
  async meter(request: MeterRequest): Promise<MeterResult> {
    const event = { ...request, id: request.id ?? newEventId() };
    const answer = await this.call("POST", "/v1/meter", event);
    return { ...(answer as unknown as MeterResult), id: event.id };
  }

  /** The account's licenses, every feature's decision (with upgrade hints) and its meters. */
  async entitlements(account: string, options: { user?: string; region?: string } = {}): Promise<Entitlements> {
    const query = new URLSearchParams();
    if (options.user !== undefined) query.set("user", options.user);
    if (options.region !== undefined) query.set("region", options.region);
    const suffix = query.size > 0 ? `?${query.toString()}` : "";
    return (await this.call("GET", `/v1/entitlements/${encodeURIComponent(account)}${suffix}`)) as unknown as Entitlements;
  }

  /** The upgrade that would allow a denied decision, as "plan:id" or "addon:id". */
  static upgradeHint(decision: Pick<Decision, "upgrade">): string | undefined {
    return decision.upgrade ? `${decision.upgrade.kind}:${decision.upgrade.id}` : undefined;
  }

  private async orFallback<T>(call: () => Promise<T>, fallback: () => T): Promise<T> {
    try {
      return await call();
    } catch (error) {
      if (error instanceof TollgateError && error.unavailable && this.fallback !== "error") {
        return fallback();
      }
      throw error;
    }
  }

  private async call(method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
    let wait = this.retryBackoffMs;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.attempt(method, path, body);
      } catch (error) {
        if (!(error instanceof TollgateError) || !error.unavailable || attempt >= this.retries) {
          throw error;
        }
        await sleep(wait);
        wait *= 2;
      }
    }
  }

  private async attempt(method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.timeoutMs);
    let response: Response;
    let text: string;
    try {
      const init: RequestInit = { method, signal: controller.signal };
      if (body !== undefined) {
        init.headers = { "content-type": "application/json" };
        init.body = JSON.stringify(body);
      }
      response = await this.fetchImpl(this.baseUrl + path, init);
      text = await response.text();
    } catch (error) {
      const timedOut = controller.signal.aborted;
      const message = timedOut
        ? `\`${path}\` did not answer within ${this.timeoutMs} ms`
        : `cannot reach the sidecar for \`${path}\`: ${(error as Error).message}`;
      throw new TollgateError(message, timedOut ? "timeout" : "unreachable", undefined, true);
    } finally {
      clearTimeout(timer);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new TollgateError(`\`${path}\` answered ${response.status} with a body that is not JSON`, "invalid_answer", response.status, response.status >= 500);
    }
    if (!response.ok) {
      const detail = (parsed as { error?: { code?: string; message?: string } }).error ?? {};
      throw new TollgateError(
        `\`${path}\` answered ${response.status} \`${detail.code ?? "unknown"}\`: ${detail.message ?? text}`,
        detail.code ?? "unknown",
        response.status,
        response.status >= 500,
      );
    }
    return parsed as Record<string, unknown>;
  }
}
