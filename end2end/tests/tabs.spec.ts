import { expect, test, type BrowserContext, type Page } from "@playwright/test";
import { OwnServer, change, grouped, signIn, sqliteUrl, userFor } from "./support";

/** SPEC §11: the tabs of one browser share one live connection. */

const SSE_PATH = "/api/credits/sse";

/** The live connections each open tab of a context holds, as the browser sees them. */
class Connections {
  private readonly sockets = new Map<Page, number>();
  private readonly streams = new Map<Page, Set<unknown>>();

  constructor(context: BrowserContext) {
    context.on("page", (page) => {
      this.sockets.set(page, 0);
      this.streams.set(page, new Set());
      page.on("websocket", (socket) => {
        this.sockets.set(page, (this.sockets.get(page) ?? 0) + 1);
        socket.on("close", () => this.sockets.set(page, (this.sockets.get(page) ?? 1) - 1));
      });
      page.on("request", (request) => {
        if (new URL(request.url()).pathname === SSE_PATH) this.streams.get(page)?.add(request);
      });
      const ended = (request: unknown) => this.streams.get(page)?.delete(request);
      page.on("requestfinished", ended);
      page.on("requestfailed", ended);
      page.on("close", () => {
        this.sockets.delete(page);
        this.streams.delete(page);
      });
    });
  }

  webSockets(): number {
    return [...this.sockets.values()].reduce((sum, n) => sum + n, 0);
  }

  sseStreams(): number {
    return [...this.streams.values()].reduce((sum, open) => sum + open.size, 0);
  }
}

/** Opens `count` tabs of `path` for `user`, one after the other, as a person would. */
async function openTabs(context: BrowserContext, user: string, count: number, path: string, baseURL = "") {
  const pages: Page[] = [];
  for (let i = 0; i < count; i++) {
    const page = await context.newPage();
    if (i === 0) await signIn(page, user, baseURL);
    await page.goto(`${baseURL}${path}`);
    pages.push(page);
  }
  return pages;
}

const balance = (page: Page) => page.getByTestId("balance");

/** Notes in the page when the navbar balance shows each text, by the browser's clock. */
async function recordBalanceTimes(page: Page) {
  await balance(page).evaluate((element) => {
    const seen: Record<string, number> = {};
    (window as unknown as { seen: Record<string, number> }).seen = seen;
    new MutationObserver(() => {
      seen[element.textContent ?? ""] ??= Date.now();
    }).observe(element, { subtree: true, childList: true, characterData: true });
  });
}

async function shownAt(page: Page, text: string): Promise<number> {
  return page.evaluate((text) => (window as unknown as { seen: Record<string, number> }).seen[text], text);
}
const role = (page: Page) => page.getByTestId("debug-role");

async function roles(pages: Page[]): Promise<string[]> {
  return Promise.all(pages.map((page) => role(page).innerText()));
}

/** Waits until exactly one of `pages` leads and the others follow, all counting `pages.length` tabs. */
async function expectOneLeader(pages: Page[]) {
  await expect.poll(async () => (await roles(pages)).sort().join(","), { timeout: 5_000 }).toBe(
    ["leader", ...Array(pages.length - 1).fill("follower")].sort().join(","),
  );
  for (const page of pages) {
    await expect(page.getByTestId("debug-tabs")).toHaveText(String(pages.length), { timeout: 5_000 });
  }
}

test("five tabs hold one WebSocket and all show a change within 2 s", async ({ context }) => {
  const connections = new Connections(context);
  const user = userFor("tabs-five");
  const pages = await openTabs(context, user, 5, "/debug");
  await expectOneLeader(pages);
  for (const page of pages) {
    await expect(page.getByTestId("debug-transport")).toHaveText("websocket");
    await expect(page.getByTestId("debug-status")).toHaveText("live");
  }
  expect(connections.webSockets()).toBe(1);

  await Promise.all(pages.map(recordBalanceTimes));
  const total = await change(context.request, user, 55);
  for (const page of pages) {
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });
  }
  expect(connections.webSockets()).toBe(1);
  const shown = await Promise.all(pages.map((page) => shownAt(page, grouped(total))));
  console.log(`relay: the last of 5 tabs showed the change ${Math.max(...shown) - Math.min(...shown)} ms after the first`);
});

test("a follower's transport buttons drive the shared connection", async ({ context }) => {
  const connections = new Connections(context);
  const user = userFor("tabs-buttons");
  const pages = await openTabs(context, user, 2, "/debug");
  await expectOneLeader(pages);
  const follower = pages[(await roles(pages)).indexOf("follower")];
  await follower.getByRole("button", { name: "Connect SSE" }).click();
  for (const page of pages) {
    await expect(page.getByTestId("debug-transport")).toHaveText("sse");
    await expect(page.getByTestId("debug-mode")).toHaveText("sse only");
  }
  await expect.poll(() => connections.webSockets()).toBe(0);
  expect(connections.sseStreams()).toBe(1);
  const total = await change(context.request, user, 2);
  for (const page of pages) {
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });
  }
});

test("without Web Locks every tab connects on its own", async ({ context }) => {
  await context.addInitScript(() => {
    Object.defineProperty(Navigator.prototype, "locks", { get: () => undefined });
  });
  const connections = new Connections(context);
  const user = userFor("tabs-alone");
  const pages = await openTabs(context, user, 3, "/debug");
  for (const page of pages) {
    await expect(role(page)).toHaveText("alone");
    await expect(page.getByTestId("debug-status")).toHaveText("live");
  }
  expect(connections.webSockets()).toBe(3);
  const total = await change(context.request, user, 3);
  for (const page of pages) {
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });
  }
});

test("closing the leading tab hands the connection on within a second", async ({ context }) => {
  const connections = new Connections(context);
  const user = userFor("tabs-failover");
  const pages = await openTabs(context, user, 5, "/debug");
  await expectOneLeader(pages);
  await expect.poll(() => connections.webSockets()).toBe(1);

  const leader = pages[(await roles(pages)).indexOf("leader")];
  const others = pages.filter((page) => page !== leader);
  const closed = Date.now();
  await leader.close();
  await expect
    .poll(async () => connections.webSockets() === 1 && (await roles(others)).includes("leader"), {
      timeout: 1_000,
      intervals: [25],
    })
    .toBe(true);
  const handedOver = Date.now() - closed;
  console.log(`failover: a new leader's WebSocket was open ${handedOver} ms after the leading tab closed`);

  await expectOneLeader(others);
  const total = await change(context.request, user, 21);
  for (const page of others) {
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });
  }
  expect(connections.webSockets()).toBe(1);
});

test("with WebSocket blocked, ten tabs share one SSE stream and all load and update", async ({ context }) => {
  await context.routeWebSocket(/\/ws$/, (socket) => socket.close());
  const connections = new Connections(context);
  const user = userFor("tabs-sse");
  const pages = await openTabs(context, user, 10, "/debug");
  for (const page of pages) {
    await expect(page.getByTestId("debug-transport")).toHaveText("sse", { timeout: 10_000 });
  }
  await expectOneLeader(pages);
  expect(connections.sseStreams()).toBe(1);

  const total = await change(context.request, user, 10);
  for (const page of pages) {
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 3_000 });
  }
  // The app's own requests are not starved: a page load in any tab still completes.
  await pages[9].getByRole("link", { name: "Home" }).first().click();
  await expect(pages[9].getByTestId("home-user")).toContainText(user);
  expect(connections.sseStreams()).toBe(1);
});

test("signing out in one tab signs out every tab", async ({ context }) => {
  const user = userFor("tabs-sign-out");
  const debug = await openTabs(context, user, 3, "/debug");
  const login = await context.newPage();
  await login.goto("/login");
  await expect(login.getByTestId("connection")).toHaveText("Live");
  for (const page of debug) {
    await expect(page.getByTestId("debug-tabs")).toHaveText("4", { timeout: 5_000 });
  }
  await login.getByRole("button", { name: "Sign out" }).click();
  for (const page of [login, ...debug]) {
    await expect(balance(page)).toHaveText("—", { timeout: 2_000 });
  }
  for (const page of debug) {
    await expect(page.getByTestId("debug-user")).toHaveText("signed out");
    await expect(page.getByTestId("debug-status")).toHaveText("signed out");
  }
});

test("a dev session with a 4 s token stays live for three lifetimes without reconnecting", async ({ context }) => {
  const ttl = 4;
  const server = new OwnServer({ DATABASE_URL: sqliteUrl(), LIVECREDITS_DEV_SESSION_TTL_S: String(ttl) });
  await server.start();
  try {
    const user = userFor("tabs-ttl");
    const [page] = await openTabs(context, user, 1, "/debug", server.url);
    await expect(page.getByTestId("debug-status")).toHaveText("live");
    await page.waitForTimeout(3 * ttl * 1_000 + 500);

    const log = await page.getByTestId("event-log").locator("li").allInnerTexts();
    expect(log.filter((line) => line.includes("opening"))).toHaveLength(1);
    expect(log.filter((line) => line.includes("token refreshed in place")).length).toBeGreaterThanOrEqual(3);
    expect(log.filter((line) => /reconnecting|expired|signed out/.test(line))).toEqual([]);
    await expect(page.getByTestId("debug-status")).toHaveText("live");
    const total = await change(context.request, user, 4, server.url);
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 1_000 });
  } finally {
    await server.stop();
  }
});
