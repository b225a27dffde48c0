import { expect, test } from "@playwright/test";
import {
  OwnServer,
  change,
  controlWebSocket,
  expectTransport,
  grouped,
  postgresUrl,
  signIn,
  sqliteUrl,
  userFor,
} from "./support";

const balance = (page: import("@playwright/test").Page) => page.getByTestId("balance");

test("the navbar shows the server-rendered balance before hydration", async ({ page }) => {
  const user = userFor("ssr");
  await signIn(page, user);
  await change(page.request, user, 1_234_567);
  await page.route("**/*.wasm", (route) => route.abort());
  await page.goto("/");
  await expect(balance(page)).toHaveText("1,234,567");
  await expect(page.locator(".app")).toHaveAttribute("data-hydrated", "false");
});

test("a change appears within a second over WebSocket", async ({ page }) => {
  const user = userFor("ws");
  await signIn(page, user);
  await page.goto("/debug");
  await expectTransport(page, "websocket");
  await expect(page.getByTestId("connection")).toHaveText("Live");
  const total = await change(page.request, user, 250);
  await expect(balance(page)).toHaveText(grouped(total), { timeout: 1_000 });
  await expect(page.getByTestId("balance-change")).toHaveText("+250");
  await page.screenshot({ path: "../docs/screenshots/navbar.png", clip: { x: 0, y: 0, width: 1280, height: 64 } });
});

test("with WebSocket blocked it falls back to SSE and still updates", async ({ page }) => {
  const user = userFor("sse");
  await controlWebSocket(page);
  await signIn(page, user);
  await page.goto("/debug");
  await expectTransport(page, "sse");
  const total = await change(page.request, user, 42);
  await expect(balance(page)).toHaveText(grouped(total), { timeout: 1_000 });
});

test("with WebSocket and SSE blocked it polls, then climbs back to WebSocket", async ({ page }) => {
  const user = userFor("poll");
  const ws = await controlWebSocket(page);
  await page.route("**/api/credits/sse", (route) => route.abort());
  await signIn(page, user);
  await page.goto("/debug");
  await expectTransport(page, "polling");
  await expect(page.getByTestId("connection")).toHaveText("Degraded");
  const total = await change(page.request, user, 7);
  await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });

  ws.blocked = false;
  await expectTransport(page, "websocket", 15_000);
  const after = await change(page.request, user, 3);
  await expect(balance(page)).toHaveText(grouped(after), { timeout: 1_000 });
});

test("the debug buttons switch transports and Disconnect stops updates", async ({ page }) => {
  const user = userFor("debug");
  await signIn(page, user);
  await page.goto("/debug");
  await expectTransport(page, "websocket");
  for (const [button, transport] of [
    ["Connect SSE", "sse"],
    ["Start polling", "polling"],
    ["Connect WebSocket", "websocket"],
  ]) {
    await page.getByRole("button", { name: button }).click();
    await expectTransport(page, transport);
    await expect(page.getByTestId("debug-mode")).toHaveText(`${transport} only`);
  }

  await page.getByRole("button", { name: "Disconnect" }).click();
  await expectTransport(page, "none");
  await expect(page.getByTestId("debug-status")).toHaveText("offline");
  const before = await balance(page).textContent();
  const total = await change(page.request, user, 11);
  await page.waitForTimeout(1_500);
  await expect(balance(page)).toHaveText(before ?? "");

  await page.getByRole("button", { name: "Automatic" }).click();
  await expectTransport(page, "websocket");
  await expect(balance(page)).toHaveText(grouped(total), { timeout: 2_000 });
  await expect(page.getByTestId("ledger").locator("tbody tr")).toHaveCount(1);
  await expect(page.getByTestId("event-log")).toContainText("live websocket");
});

test("the debug page simulates changes and pages through the ledger", async ({ page }) => {
  const user = userFor("ledger");
  await signIn(page, user);
  for (let i = 0; i < 12; i++) await change(page.request, user, 1);
  await page.goto("/debug");
  await expectTransport(page, "websocket");
  const rows = page.getByTestId("ledger").locator("tbody tr");
  await expect(rows).toHaveCount(10);
  await page.getByRole("button", { name: "Older" }).click();
  await expect(rows).toHaveCount(2);
  await page.getByRole("button", { name: "Newer" }).click();
  await expect(rows.first().locator("td").first()).toHaveText("12");

  await page.getByLabel("Amount", { exact: true }).fill("-5");
  await page.getByLabel("Type").fill("spend");
  await page.getByRole("button", { name: "Apply" }).click();
  await expect(balance(page)).toHaveText("7", { timeout: 1_000 });
  await expect(rows.first().locator("td").first()).toHaveText("13");
  await page.screenshot({ path: "../docs/screenshots/debug.png", fullPage: true });
});

test("sign in with a pasted token, then sign out", async ({ page, request }) => {
  const user = userFor("token");
  const login = await request.post("/api/dev/login", { data: { user_id: user } });
  const { token } = await login.json();
  await page.goto("/login");
  await page.getByLabel("JWT from your identity provider").fill(token);
  await page.getByRole("button", { name: "Use this token" }).click();
  await expect(page.getByTestId("user")).toHaveText(user);
  await expect(page.getByTestId("connection")).toHaveText("Live");
  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page.getByTestId("user")).toHaveCount(0);
  await expect(balance(page)).toHaveText("—");
  await page.reload();
  await expect(balance(page)).toHaveText("—");
});

test("the page reconnects after a server restart and shows the change made meanwhile", async ({ page }) => {
  const server = new OwnServer({ DATABASE_URL: sqliteUrl() });
  await server.start();
  try {
    const user = userFor("restart");
    await signIn(page, user, server.url);
    await page.goto(`${server.url}/debug`);
    await expectTransport(page, "websocket");
    await server.stop();
    await expect(page.getByTestId("connection")).not.toHaveText("Live");
    await server.start();
    const total = await change(page.request, user, 99, server.url);
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 15_000 });
    await expectTransport(page, "websocket");
  } finally {
    await server.stop();
  }
});

test("with two instances, a tab on one shows a change made through the other", async ({ page }) => {
  const database = postgresUrl();
  const prefix = `e2e-${Date.now()}`;
  const env = { DATABASE_URL: database, REDIS_URL: "redis://127.0.0.1:6379", REDIS_CHANNEL_PREFIX: prefix };
  const a = new OwnServer(env);
  const b = new OwnServer(env);
  await a.start();
  await b.start();
  try {
    const user = userFor("pair");
    await signIn(page, user, a.url);
    await page.goto(`${a.url}/debug`);
    await expectTransport(page, "websocket");
    const total = await change(page.request, user, 500, b.url);
    await expect(balance(page)).toHaveText(grouped(total), { timeout: 1_000 });
  } finally {
    await a.stop();
    await b.stop();
  }
});
