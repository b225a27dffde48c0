import { expect, test, type APIRequestContext, type Page } from "@playwright/test";
import { SERVICE_KEY, change, controlWebSocket, expectTransport, grouped, signIn, userFor } from "./support";

/** Places a hold through the service API and returns its id. */
async function hold(request: APIRequestContext, user: string, amount: number, ttl_s = 900): Promise<string> {
  const response = await request.post("/api/credits/holds", {
    headers: { authorization: `Bearer ${SERVICE_KEY}` },
    data: { user_id: user, amount, ttl_s },
  });
  expect(response.status()).toBe(201);
  return (await response.json()).hold.id;
}

const available = (page: Page) => page.getByTestId("balance");
const held = (page: Page) => page.getByTestId("held");

// SPEC §12: a hold lowers the navbar's available credits live on every transport.
for (const transport of ["websocket", "sse", "polling"]) {
  test(`a hold lowers the available credits within 2 s over ${transport}`, async ({ page }) => {
    const user = userFor(`hold-${transport}`);
    if (transport !== "websocket") await controlWebSocket(page);
    if (transport === "polling") await page.route("**/api/credits/sse", (route) => route.abort());
    await signIn(page, user);
    await change(page.request, user, 1_000);
    await page.goto("/debug");
    await expectTransport(page, transport);
    await expect(available(page)).toHaveText("1,000");
    await expect(held(page)).toHaveCount(0);

    const id = await hold(page.request, user, 300);
    await expect(available(page)).toHaveText(grouped(700), { timeout: 2_000 });
    await expect(held(page)).toHaveText("300 held");
    await expect(page.getByTestId("hold")).toHaveCount(1);

    const released = await page.request.post(`/api/credits/holds/${id}/release`, {
      headers: { authorization: `Bearer ${SERVICE_KEY}` },
    });
    expect(released.status()).toBe(200);
    await expect(available(page)).toHaveText("1,000", { timeout: 2_000 });
    await expect(held(page)).toHaveCount(0);
  });
}

test("an expiring hold gives its credits back, counting down on /debug", async ({ page }) => {
  const user = userFor("hold-expiry");
  await signIn(page, user);
  await change(page.request, user, 50);
  await page.goto("/debug");
  await expectTransport(page, "websocket");
  await hold(page.request, user, 20, 3);
  await expect(available(page)).toHaveText("30", { timeout: 2_000 });
  await expect(page.getByTestId("hold-countdown")).toHaveText(/^[0-3] s$/);
  // Expired within 5 s of its expiry (SPEC §12), pushed without a reload.
  await expect(available(page)).toHaveText("50", { timeout: 9_000 });
  await expect(page.getByTestId("hold")).toHaveCount(0);
});

test("in dev mode the debug page places, captures and releases holds", async ({ page }) => {
  const user = userFor("hold-dev");
  await signIn(page, user);
  await change(page.request, user, 100);
  await page.goto("/debug");
  await expectTransport(page, "websocket");
  await page.getByLabel("Hold amount").fill("40");
  await page.getByRole("button", { name: "Place hold" }).click();
  await expect(available(page)).toHaveText("60", { timeout: 2_000 });
  await expect(page.getByTestId("hold")).toHaveCount(1);
  await page.getByRole("button", { name: "Capture" }).click();
  await expect(available(page)).toHaveText("60", { timeout: 2_000 });
  await expect(held(page)).toHaveCount(0);
  await expect(page.getByTestId("ledger")).toContainText("capture");

  await page.getByRole("button", { name: "Place hold" }).click();
  await expect(available(page)).toHaveText("20", { timeout: 2_000 });
  await expect(held(page)).toHaveText("40 held");
  await page.screenshot({ path: "../docs/screenshots/holds.png", fullPage: true });
  await page.getByRole("button", { name: "Release" }).click();
  await expect(available(page)).toHaveText("60", { timeout: 2_000 });
});
