// The types the generated checks use: @grafana/schema's, as they look in JSON.
import type { Dashboard, DataQuery, Panel } from '@grafana/schema';
export type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
export type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
export type { Dashboard, Panel };

/**
 * A type as written in JSON: string enums become their string values (JSON cannot name an enum
 * member); everything else keeps its shape, so required fields and misspelt keys still fail.
 */
export type Json<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U>>
      : T extends object
        ? { [K in keyof T]: Json<T[K]> }
        : T;

/** A Prometheus panel query (the Prometheus data source's query model is not in @grafana/schema). */
export interface PromTarget extends DataQuery {
  datasource: { type: 'prometheus'; uid: string };
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  interval?: string;
}
